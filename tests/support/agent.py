"""A real device agent for tests: uvicorn on a free loopback port in a background thread, real ONNX Runtime."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from device_agent.config import AgentSettings
from device_agent.keys import Keyring, generate_keypair, load_private_key
from device_agent.repository import Repository
from device_agent.server import create_app
from tests.support.bundles import write_tiny_bundle
from tests.support.limits import memory_capped
from tests.support.network import free_port, serving  # serving: re-exported for the tests that import it from here

ADMIN_TOKEN = "test-admin-token-0123456789abcdef"
MODEL = "tiny-classifier"


@dataclass
class LiveAgent:
    """A running agent and what the tests need to talk to it."""

    url: str  # http://127.0.0.1:PORT
    address: str  # 127.0.0.1:PORT, as tritonclient wants it
    workdir: Path
    settings: AgentSettings
    repository: Repository

    @property
    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    def bundle(self, version: str) -> Path:
        """A signed bundle of the tiny classifier at ``version`` (written on first use)."""
        path = self.workdir / "bundles" / f"tiny-{version}.ekb"
        if not path.exists():
            write_tiny_bundle(path, load_private_key(self.workdir / "keys" / "edgekit.key"), version=version)
        return path

    def model_file(self, version: str = "1.0.0") -> Path:
        """The ONNX file inside ``bundle(version)``, to run in-process as the reference."""
        self.bundle(version)
        return self.workdir / "bundles" / f"tiny-{version}-payload" / "model.onnx"

    def install(self, version: str) -> httpx.Response:
        return httpx.post(f"{self.url}/admin/models", content=self.bundle(version).read_bytes(), headers=self.admin_headers, timeout=60)


def wait_ready(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while httpx.get(f"{url}/v2/health/ready").status_code != 200:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the agent at {url} did not become ready")
        time.sleep(0.02)


@contextmanager
def live_agent(workdir: Path, *, admin_token: bool = True, **settings: object) -> Iterator[LiveAgent]:
    """A fresh agent with an empty state folder, a keyring trusting a fresh key, and the admin token set."""
    generate_keypair(workdir / "keys")
    keyring_dir = workdir / "keyring"
    keyring_dir.mkdir()
    shutil.copy(workdir / "keys" / "edgekit.pub", keyring_dir / "build-host.pub")
    token_file = None
    if admin_token:
        token_file = workdir / "admin.token"
        token_file.write_text(ADMIN_TOKEN + "\n")
        token_file.chmod(0o600)
    agent_settings = AgentSettings(
        state_dir=workdir / "state", keyring_dir=keyring_dir, admin_token_file=token_file, **settings  # type: ignore[arg-type]
    )
    repository = Repository(agent_settings.state_dir, Keyring.load(keyring_dir), keep_versions=agent_settings.keep_versions)
    with serving(create_app(repository, agent_settings)) as address:
        agent = LiveAgent(f"http://{address}", address, workdir, agent_settings, repository)
        wait_ready(agent.url)
        yield agent


class AgentProcess:
    """`edgekit-agent serve` as a real subprocess (so it can be killed with SIGKILL and restarted on the same state)."""

    def __init__(self, workdir: Path, keyring_dir: Path, **settings: object) -> None:
        """Write ``workdir/agent.yaml`` (state in ``workdir/state``, the admin token set) plus ``settings``, more
        AgentSettings fields such as ``telemetry_url``; nothing runs until :meth:`start`."""
        import subprocess
        import sys

        self._subprocess, self._python = subprocess, sys.executable
        self.workdir = workdir
        token = workdir / "admin.token"
        token.write_text(ADMIN_TOKEN)
        token.chmod(0o600)
        self.config = workdir / "agent.yaml"
        # JSON scalars are YAML too: quoted and escaped, whatever the value holds.
        extra = "".join(f"{name}: {json.dumps(str(value) if isinstance(value, Path) else value)}\n" for name, value in settings.items())
        self.config.write_text(f"state_dir: state\nkeyring_dir: {keyring_dir}\nadmin_token_file: admin.token\nlog_level: warning\n{extra}")
        self.process = None
        self.url = ""

    @property
    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    def start(self, timeout: float = 60, *, memory_limit: int | None = None) -> "AgentProcess":
        """Run the agent; ``memory_limit`` caps its address space (RLIMIT_AS, bytes): past it allocations fail."""
        port = free_port()
        command = [self._python, "-c", "from device_agent.cli import main; main()", "serve", "--config", str(self.config), "--port", str(port)]
        self.process = self._subprocess.Popen(command, stdout=self._subprocess.DEVNULL, stderr=self._subprocess.DEVNULL,
                                              **memory_capped(memory_limit))
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the agent did not become ready (exit code {self.process.poll()})")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no cleanup, no flush by the process (the operating system still writes its page cache, unlike a power cut)."""
        self.process.kill()
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except self._subprocess.TimeoutExpired:
                self.kill()
