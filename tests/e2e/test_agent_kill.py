"""kill -9 the real agent process while it receives and installs a bundle; a restart serves the old or the new version."""

from __future__ import annotations

import random
import shutil
import threading
import time

import httpx
import numpy as np
import pytest

from device_agent.bundle import write_bundle
from tests.support.agent import MODEL, AgentProcess
from tests.support.bundles import tiny_manifest, tiny_payload, write_tiny_bundle

TRIALS = 20


def _post_in_background(agent: AgentProcess, bundle_bytes: bytes) -> threading.Thread:
    def post() -> None:
        try:
            httpx.post(f"{agent.url}/admin/models", content=bundle_bytes, headers=agent.admin_headers, timeout=60)
        except httpx.TransportError:
            pass  # the agent was killed mid-request: that is the point

    thread = threading.Thread(target=post, daemon=True)
    thread.start()
    return thread


def _served_version(agent: AgentProcess) -> str:
    assert httpx.get(f"{agent.url}/v2/models/{MODEL}/ready").status_code == 200
    metadata = httpx.get(f"{agent.url}/v2/models/{MODEL}").json()
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0.1, 0.2, 0.3, 0.4]}]}
    assert httpx.post(f"{agent.url}/v2/models/{MODEL}/infer", json=body).status_code == 200
    return metadata["versions"][0]


@pytest.mark.slow
def test_kill_9_of_the_agent_during_install(tmp_path, keyring_dir, signing_key):
    base = tmp_path / "base"
    base.mkdir()
    agent = AgentProcess(base, keyring_dir).start()
    v1 = tmp_path / "v1.ekb"
    write_tiny_bundle(v1, signing_key, "1.0.0")
    assert httpx.post(f"{agent.url}/admin/models", content=v1.read_bytes(), headers=agent.admin_headers).status_code == 200
    agent.stop()

    # 24 MB of padding makes upload, verification and unpacking long enough to be cut anywhere.
    payload = tiny_payload(tmp_path / "v2")
    padding = tmp_path / "v2" / "padding.bin"
    padding.write_bytes(np.random.default_rng(0).bytes(24 << 20))
    v2 = tmp_path / "v2.ekb"
    write_bundle(v2, tiny_manifest("2.0.0"), {**payload, "padding.bin": padding}, signing_key)
    v2_bytes = v2.read_bytes()

    timing_dir = tmp_path / "timing"
    shutil.copytree(base, timing_dir)
    agent = AgentProcess(timing_dir, keyring_dir).start()
    started = time.perf_counter()
    assert httpx.post(f"{agent.url}/admin/models", content=v2_bytes, headers=agent.admin_headers, timeout=60).status_code == 200
    install_seconds = time.perf_counter() - started
    agent.stop()

    rng = random.Random(1127)
    outcomes = []
    for trial in range(TRIALS):
        workdir = tmp_path / f"trial-{trial}"
        shutil.copytree(base, workdir)
        agent = AgentProcess(workdir, keyring_dir).start()
        upload = _post_in_background(agent, v2_bytes)
        time.sleep(rng.uniform(0, install_seconds * 1.2))
        agent.kill()
        upload.join(timeout=30)
        restarted = agent.start()  # same state folder, new process
        try:
            version = _served_version(restarted)
        finally:
            restarted.stop()
        assert version in ("1.0.0", "2.0.0"), f"trial {trial}: serves {version}"
        state = workdir / "state"
        assert list((state / "staging").iterdir()) == [] and list((state / "uploads").iterdir()) == []
        outcomes.append(version)
        shutil.rmtree(workdir)
    print(f"install over HTTP takes {install_seconds * 1000:.0f} ms; after kill -9: "
          f"{outcomes.count('1.0.0')} old, {outcomes.count('2.0.0')} new")
    assert "1.0.0" in outcomes
