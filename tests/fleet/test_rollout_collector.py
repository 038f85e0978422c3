"""The desired-state API of a real collector, and rollouts advanced by real collector processes: one killed with
kill -9 mid-rollout, and two sharing one PostgreSQL database."""

from __future__ import annotations

import hashlib
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.desired_schema import DeviceReport, InstallOutcome
from edgekit.fleet.rollouts import Selection, deploy, show_rollout
from edgekit.fleet.store import Store
from tests.fleet.conftest import collector_in_thread, collector_process, postgres_schema
from tests.support.bundles import write_tiny_bundle
from tests.support.fleet_devices import SimulatedDevice

MODEL = "tiny-classifier"


@pytest.fixture(scope="module")
def bundle_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bundles") / "v2.ekb"
    write_tiny_bundle(path, Ed25519PrivateKey.generate(), "2.0.0")
    return path


def _get(url: str, token: str | None, **headers: str) -> httpx.Response:
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.get(url, headers=headers, timeout=30)


def test_a_device_reads_its_desired_state_and_only_its_own_bundles_resumably(store: Store, bundle_file: Path):
    tokens = {name: store.add_device(name) for name in ("dev-a", "dev-b")}
    deploy(store, bundle_file, Selection(devices=("dev-a",)))
    data = bundle_file.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    with collector_in_thread(store) as url:
        desired = _get(f"{url}/v1/devices/dev-a/desired", tokens["dev-a"]).json()
        assert desired["models"] == [{"name": MODEL, "version": "2.0.0", "sha256": sha, "size": len(data), "rollout_id": 1}]
        assert _get(f"{url}/v1/devices/dev-b/desired", tokens["dev-b"]).json()["models"] == []
        assert _get(f"{url}/v1/devices/dev-a/desired", tokens["dev-b"]).status_code == 403
        assert _get(f"{url}/v1/devices/dev-a/desired", None).status_code == 401

        whole = _get(f"{url}/v1/bundles/{sha}", tokens["dev-a"])
        assert whole.status_code == 200 and whole.content == data
        rest = _get(f"{url}/v1/bundles/{sha}", tokens["dev-a"], Range="bytes=1000-")
        assert rest.status_code == 206 and rest.content == data[1000:]
        assert rest.headers["content-range"] == f"bytes 1000-{len(data) - 1}/{len(data)}"
        assert _get(f"{url}/v1/bundles/{sha}", tokens["dev-a"], Range=f"bytes={len(data)}-").status_code == 416
        refused = _get(f"{url}/v1/bundles/{sha}", tokens["dev-b"])  # not in dev-b's desired state
        assert refused.status_code == 404 and "desired state" in refused.json()["error"]

        outcome = InstallOutcome(model=MODEL, version="2.0.0", sha256=sha, outcome="installed", at=time.time())
        report = DeviceReport(device_id="dev-a", serving={MODEL: "2.0.0"}, outcomes=[outcome]).model_dump(mode="json")
        headers = {"Authorization": f"Bearer {tokens['dev-a']}"}
        first = httpx.post(f"{url}/v1/devices/dev-a/reports", json=report, headers=headers)
        again = httpx.post(f"{url}/v1/devices/dev-a/reports", json=report, headers=headers)
        assert (first.json(), again.json()) == ({"recorded": 1}, {"recorded": 0})
        other = httpx.post(f"{url}/v1/devices/dev-a/reports", json={**report, "device_id": "dev-b"}, headers=headers)
        assert other.status_code == 403
        broken = httpx.post(f"{url}/v1/devices/dev-a/reports", json={**report, "serving": {MODEL: "v2"}}, headers=headers)
        assert broken.status_code == 422 and "serving" in broken.json()["error"]

        rotated = store.rotate_token("dev-a")
        assert _get(f"{url}/v1/devices/dev-a/desired", tokens["dev-a"]).status_code == 401  # at once
        assert _get(f"{url}/v1/devices/dev-a/desired", rotated).status_code == 200
        store.remove_device("dev-b")
        assert _get(f"{url}/v1/devices/dev-b/desired", tokens["dev-b"]).status_code == 401


def _wait_for(condition, timeout: float = 60.0, what: str = "the condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _devices(store: Store, url: str, count: int) -> list[SimulatedDevice]:
    return [SimulatedDevice(url, f"dev-{i:02d}", store.add_device(f"dev-{i:02d}")) for i in range(count)]


def _serve_rollout(devices: list[SimulatedDevice]) -> None:
    """Each device polls once; those that installed send a telemetry window."""
    for device in devices:
        device.poll()
        if MODEL in device.serving:
            device.send_window(MODEL)


def test_a_collector_killed_mid_rollout_continues_where_it_was(tmp_path: Path, bundle_file: Path):
    db_url = f"sqlite:///{tmp_path / 'fleet.db'}"
    store = Store.open(db_url)
    with collector_process(db_url, "--rollout-interval", "0.2") as collector:
        devices = _devices(store, collector.url, 3)
        rollout = deploy(store, bundle_file, Selection(all=True), waves="1,2,100%", soak_s=0)
        _serve_rollout(devices)
        _wait_for(lambda: show_rollout(store, rollout).wave == 1, what="wave 2")
        os.kill(collector.process.pid, signal.SIGKILL)
        collector.process.wait()
    with collector_process(db_url, "--rollout-interval", "0.2") as collector:
        for device in devices:
            device.url, device._client = collector.url, None
        _wait_for(lambda: (_serve_rollout(devices), show_rollout(store, rollout).state == "completed")[1],
                  what="the rollout to complete after the restart")
    view = show_rollout(store, rollout)
    assert [e["kind"] for e in view.events] == ["created", "wave_started", "wave_started", "wave_started", "completed"]
    assert all(d.installs == 1 for d in devices)
    store.close()


def test_two_collectors_on_one_postgresql_advance_each_wave_once(bundle_file: Path):
    with postgres_schema() as db_url:
        store = Store.open(db_url)
        with collector_process(db_url, "--rollout-interval", "0.1") as first, \
                collector_process(db_url, "--rollout-interval", "0.1") as second:
            devices = _devices(store, first.url, 6)
            for device in devices[::2]:
                device.url = second.url
            rollout = deploy(store, bundle_file, Selection(all=True), waves="1,2,3,4,5,100%", soak_s=0)
            _wait_for(lambda: (_serve_rollout(devices), show_rollout(store, rollout).state == "completed")[1],
                      what="the rollout to complete")
        view = show_rollout(store, rollout)
        started = [e["message"].split(":")[0] for e in view.events if e["kind"] == "wave_started"]
        assert started == [f"wave {n} started" for n in range(1, 7)]  # each wave once, in order
        assert [e["kind"] for e in view.events].count("completed") == 1
        assert len({e["actor"] for e in view.events if e["kind"] != "created"}) >= 1
        store.close()
