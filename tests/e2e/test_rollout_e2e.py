"""Issue #13's "done when", with real processes: one `edgekit fleet serve`, three `edgekit-agent serve` pulling their
desired state from it, and the operator's `edgekit fleet` commands run as subprocesses.

v1 reaches all three devices. v2, deployed with ``--waves 1,100% --gate p95_ms<=0.001`` (a gate no real request
holds), is installed on the canary only, halted by its gate and rolled back: the canary reactivates its own copy of
v1 and the other two never fetch v2. Last, the agents' repository unload refuses a caller without the admin token.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from device_agent.keys import generate_keypair, load_private_key
from tests.fleet.conftest import collector_process
from tests.support.agent import ADMIN_TOKEN, MODEL
from tests.support.bundles import write_tiny_bundle
from tests.support.network import free_port

DEVICES = ("dev-1", "dev-2", "dev-3")  # sorted: dev-1 is the canary of a 1,100% rollout
CANARY = "dev-1"


def _wait(condition: Callable[[], Any], timeout: float, what: Callable[[], str] | str, every: float = 0.2) -> Any:
    """The first truthy value of ``condition()``; AssertionError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what() if callable(what) else what}")
        time.sleep(every)


def _edgekit(*args: str) -> str:
    """Run ``edgekit ARGS`` as the operator would; its stdout (it must succeed)."""
    result = subprocess.run([sys.executable, "-m", "edgekit", *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"edgekit {' '.join(args)} exited {result.returncode}: {result.stderr}"
    return result.stdout


class Agent:
    """`edgekit-agent serve` with the pull flags, as a subprocess with its own state folder; its log in a file."""

    def __init__(self, workdir: Path, device: str, keyring: Path, telemetry_url: str, device_token: Path) -> None:
        self.device = device
        self.workdir = workdir
        self.state = workdir / "state"
        self.log = workdir / "agent.log"
        admin_token = workdir / "admin.token"
        admin_token.write_text(ADMIN_TOKEN + "\n")
        admin_token.chmod(0o600)
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.command = [
            sys.executable, "-c", "from device_agent.cli import main; main()", "serve",
            "--state-dir", str(self.state), "--keyring", str(keyring), "--admin-token-file", str(admin_token),
            "--port", str(port), "--telemetry-url", telemetry_url, "--device-id", device,
            "--device-token-file", str(device_token), "--poll-seconds", "0.5", "--window-seconds", "1",
        ]
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT)

    def ready(self) -> bool:
        assert self.process is not None and self.process.poll() is None, f"{self.device} exited: {self.log_tail()}"
        try:
            return httpx.get(f"{self.url}/v2/health/ready", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    def serving(self) -> list[str]:
        """The versions the model metadata lists (the one that serves), [] when none does."""
        answer = httpx.get(f"{self.url}/v2/models/{MODEL}", timeout=10)
        return answer.json()["versions"] if answer.status_code == 200 else []

    def held(self) -> dict[str, str]:
        """Every version in the repository index, with its state (READY serves, AVAILABLE is on disk)."""
        answer = httpx.post(f"{self.url}/v2/repository/index", json={}, timeout=10)
        answer.raise_for_status()
        return {entry["version"]: entry["state"] for entry in answer.json() if entry["name"] == MODEL}

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else "(no log)"

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)


class Traffic:
    """Inference requests to every agent, a few a second, from a thread: windows close with whatever version serves.

    Answers are not checked here (a device with no model yet answers 404); the test checks what serves.
    """

    def __init__(self, agents: list[Agent]) -> None:
        self.agents = agents
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)

    def __enter__(self) -> "Traffic":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        rng = np.random.default_rng(0)
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                for agent in self.agents:
                    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                        "data": rng.normal(size=4).astype(np.float32).tolist()}]}
                    try:
                        client.post(f"{agent.url}/v2/models/{MODEL}/infer", json=body)
                    except httpx.HTTPError:
                        pass
                self._stop.wait(0.1)


def _show(db: str, rollout_id: int) -> dict:
    return json.loads(_edgekit("fleet", "rollout", "show", str(rollout_id), "--db", db, "--json"))


def _deploy(db: str, bundle: Path, *options: str) -> dict:
    return json.loads(_edgekit("fleet", "deploy", str(bundle), "--db", db, "--all", "--soak", "0", *options, "--json"))


def _wait_for_state(db: str, rollout_id: int, state: str, timeout: float) -> dict:
    last: dict = {}

    def reached() -> dict | None:
        nonlocal last
        last = _show(db, rollout_id)
        assert last["state"] in ("running", state), f"rollout {rollout_id} ended {last['state']}: {last['reason']}"
        return last if last["state"] == state else None

    return _wait(reached, timeout, lambda: f"rollout {rollout_id} to be {state}; last seen: {json.dumps(last, indent=1)}")


@pytest.mark.slow
def test_three_agents_take_v1_and_roll_a_gated_v2_back(tmp_path):
    db = f"sqlite:///{tmp_path / 'fleet.sqlite'}"
    generate_keypair(tmp_path / "keys")
    key = load_private_key(tmp_path / "keys" / "edgekit.key")
    v1, v2 = tmp_path / "bundles" / "v1.ekb", tmp_path / "bundles" / "v2.ekb"
    v1.parent.mkdir()
    write_tiny_bundle(v1, key, "1.0.0")
    write_tiny_bundle(v2, key, "2.0.0")

    tokens = {device: tmp_path / f"{device}.token" for device in DEVICES}
    for device in DEVICES:
        _edgekit("fleet", "devices", "add", device, "--db", db, "--group", "line-1", "--token-file", str(tokens[device]))

    agents: list[Agent] = []
    with collector_process(db, "--rollout-interval", "0.2") as collector:
        try:
            for device in DEVICES:
                workdir = tmp_path / device
                (workdir / "keyring").mkdir(parents=True)
                shutil.copy(tmp_path / "keys" / "edgekit.pub", workdir / "keyring" / "build.pub")
                agent = Agent(workdir, device, workdir / "keyring", collector.url, tokens[device])
                agent.start()
                agents.append(agent)
            for agent in agents:
                _wait(agent.ready, 120, f"{agent.device} to be ready")
            by_device = {agent.device: agent for agent in agents}

            with Traffic(agents):
                # v1 to every device in one wave.
                first = _deploy(db, v1, "--waves", "100%")
                assert [d["desired_version"] for d in first["devices"]] == ["1.0.0"] * 3
                done = _wait_for_state(db, first["id"], "completed", 90)
                assert {d["device_id"]: (d["outcome"], d["serving_version"]) for d in done["devices"]} == {
                    device: ("installed", "1.0.0") for device in DEVICES}
                for agent in agents:
                    assert agent.serving() == ["1.0.0"], agent.device

                # v2 to a canary first, behind a gate no real request holds.
                second = _deploy(db, v2, "--waves", "1,100%", "--gate", "p95_ms<=0.001")
                assert {d["device_id"]: (d["wave"], d["desired_version"]) for d in second["devices"]} == {
                    "dev-1": (0, "2.0.0"), "dev-2": (1, "1.0.0"), "dev-3": (1, "1.0.0")}
                halted = _wait_for_state(db, second["id"], "rolled_back", 90)

                # The canary reactivates the 1.0.0 it still holds: no download; the halted rollout shows it rolled back.
                canary = by_device[CANARY]
                _wait(lambda: canary.serving() == ["1.0.0"], 60, f"{CANARY} to serve 1.0.0 again")

                def outcomes_of(rollout: dict) -> dict[str, str | None]:
                    return {d["device_id"]: d["outcome"] for d in _show(db, rollout["id"])["devices"]}

                _wait(lambda: outcomes_of(second)[CANARY] == "rolled_back", 60,
                      f"{CANARY}'s rolled_back outcome to reach the collector")
                assert outcomes_of(second) == {"dev-1": "rolled_back", "dev-2": None, "dev-3": None}
                assert outcomes_of(first) == {device: "installed" for device in DEVICES}  # v1's own rollout is unchanged

            assert halted["reason"].startswith("gate p95_ms<=0.001 breached: dev-1 window"), halted["reason"]
            assert [event["kind"] for event in halted["events"]] == ["created", "wave_started", "halted", "rolled_back"]
            assert "dev-1→1.0.0" in halted["events"][-1]["message"]
            # Only the canary ever acted on v2; the other two were never told to run it.
            assert {d["device_id"]: d["desired_version"] for d in halted["devices"]} == {device: "1.0.0" for device in DEVICES}
            assert [d["outcome"] for d in halted["devices"][1:]] == [None, None]
            with sqlite3.connect(tmp_path / "fleet.sqlite") as conn:
                acted = conn.execute("SELECT device_id, outcome FROM install_outcomes WHERE sha256 = ?",
                                     (second["sha256"],)).fetchall()
            assert acted == [("dev-1", "installed")]
            for agent in agents:
                assert agent.serving() == ["1.0.0"], agent.device
                assert not list((agent.state / "downloads").glob("*.part")), agent.device
            assert by_device["dev-1"].held() == {"1.0.0": "READY", "2.0.0": "AVAILABLE"}
            assert by_device["dev-2"].held() == by_device["dev-3"].held() == {"1.0.0": "READY"}

            listed = json.loads(_edgekit("fleet", "rollouts", "--db", db, "--json"))
            assert [(r["id"], r["model_version"], r["state"]) for r in listed] == [
                (second["id"], "2.0.0", "rolled_back"), (first["id"], "1.0.0", "completed")]

            # The repository extension's unload changes what the device serves: it needs the admin token.
            unload = f"{agents[1].url}/v2/repository/models/{MODEL}/unload"
            assert httpx.post(unload, timeout=10).status_code == 401
            assert httpx.post(unload, headers={"Authorization": "Bearer wrong-token-0123456789abcdef"},
                              timeout=10).status_code == 403
            assert httpx.get(f"{agents[1].url}/v2/models/{MODEL}/ready", timeout=10).status_code == 200
        except BaseException:
            for agent in agents:
                print(f"--- {agent.device} log tail ---\n{agent.log_tail()}")
            raise
        finally:
            for agent in agents:
                agent.stop()
