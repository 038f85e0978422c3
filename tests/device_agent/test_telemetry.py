"""The telemetry outbox and uploader: real SQLite files, a real HTTP collector stand-in on loopback, a real agent."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest

from device_agent.telemetry import Outbox, Uploader
from device_agent.telemetry_schema import DriftReference, FeatureReference, ModelRef, Thresholds, UploadBatch
from tests.support.network import free_port

DEVICE = "jetson-01"
TOKEN = "device-token-0123456789"


def _window(requests: int = 5, reference: str | None = None) -> dict:
    return {"started_at": 1.0, "ended_at": 2.0, "model": ModelRef(name="m", version="1"), "requests": requests, "errors": 0,
            "histograms": {"input.x.0": [1, 2, 2]}, "reference_sha256": reference}


def test_outbox_survives_reopen_and_never_reuses_a_sequence(tmp_path):
    path = tmp_path / "outbox.sqlite"
    outbox = Outbox(path, DEVICE)
    stored = [outbox.append(_window(requests=i)) for i in range(3)]
    assert [s.sequence for s in stored] == [0, 1, 2]
    outbox.delete([0, 1, 2])  # everything acknowledged: the table is empty
    outbox.close()
    reopened = Outbox(path, DEVICE)
    assert reopened.stats().rows == 0
    assert reopened.append(_window()).sequence == 3
    reopened.close()
    # A window committed by another process (the connection just dropped, as after kill -9) is there on reopen.
    again = Outbox(path, DEVICE)
    rows = again.pending()
    assert [sequence for sequence, _, _ in rows] == [3]
    assert json.loads(rows[0][1])["requests"] == 5
    assert again.stats().next_sequence == 4


def test_outbox_bounds_evict_oldest_and_count_across_restarts(tmp_path):
    path = tmp_path / "outbox.sqlite"
    outbox = Outbox(path, DEVICE, max_rows=3)
    for _ in range(5):
        outbox.append(_window())
    assert [s for s, _, _ in outbox.pending()] == [2, 3, 4]
    stats = outbox.stats()
    assert (stats.rows, stats.evicted_total) == (3, 2)
    last = json.loads(outbox.pending()[-1][1])
    assert last["evicted_total"] == 2  # the count travels upstream in the next windows
    outbox.close()
    reopened = Outbox(path, DEVICE, max_rows=3)
    assert reopened.append(_window()).evicted_total == 3
    size = reopened.stats().bytes // reopened.stats().rows
    reopened.close()
    by_bytes = Outbox(path, DEVICE, max_rows=100, max_bytes=size * 2 + size // 2)
    by_bytes.append(_window())
    assert by_bytes.stats().rows == 2 and by_bytes.stats().evicted_total == 5


class Collector:
    """A stand-in collector on loopback: answers each POST per a script of behaviours, then acknowledges everything."""

    def __init__(self, script: list[str] | None = None, port: int = 0) -> None:
        self.script = list(script or [])
        self.batches: list[dict] = []
        self.auth: list[str | None] = []
        self.attempts = 0
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - the http.server protocol
                collector.attempts += 1
                body = self.rfile.read(int(self.headers["Content-Length"]))
                behaviour = collector.script.pop(0) if collector.script else "ok"
                collector.auth.append(self.headers.get("Authorization"))
                if behaviour == "sleep":
                    time.sleep(1.5)
                if behaviour in ("500", "503"):
                    return self._answer(int(behaviour), {"error": "try later"})
                if behaviour == "401":
                    return self._answer(401, {"error": "unknown device token"})
                batch = UploadBatch.model_validate_json(body)
                collector.batches.append(json.loads(body))
                sequences = [w.sequence for w in batch.windows]
                if behaviour == "partial":
                    sequences = sequences[:1]
                return self._answer(200, {"stored": sequences, "duplicates": 0})

            def _answer(self, status: int, document: dict) -> None:
                data = json.dumps(document).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the client timed out and left

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def sequences(self) -> list[int]:
        return [w["sequence"] for batch in self.batches for w in batch["windows"]]


def _wait(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def _reference() -> DriftReference:
    feature = FeatureReference(kind="numeric", source="input", edges=[0.0, 1.0], proportions=[0.2, 0.6, 0.2],
                               thresholds=Thresholds(psi=0.2, js=0.2))
    return DriftReference(task="tensor", features={"input.x.0": feature}, reference_rows=100)


def test_uploader_deletes_only_acknowledged_rows_and_sends_references(tmp_path):
    from device_agent.telemetry_schema import reference_sha256

    collector = Collector(["partial"])
    outbox = Outbox(tmp_path / "outbox.sqlite", DEVICE)
    reference = _reference()
    digest = reference_sha256(reference)
    for _ in range(3):
        outbox.append(_window(reference=digest), reference)
    uploader = Uploader(outbox, collector.url, TOKEN, timeout_s=2)
    try:
        assert uploader.upload_once() == 1  # the collector stored only the first
        assert [s for s, _, _ in outbox.pending()] == [1, 2]
        assert collector.auth[0] == f"Bearer {TOKEN}"
        assert digest in collector.batches[0]["references"]
        assert uploader.upload_once() == 2
        assert outbox.stats().rows == 0
        assert collector.sequences() == [0, 1, 2, 1, 2]
    finally:
        collector.stop()


def test_uploader_retries_through_refused_connections_timeouts_and_5xx(tmp_path):
    port = free_port()
    outbox = Outbox(tmp_path / "outbox.sqlite", DEVICE)
    for _ in range(4):
        outbox.append(_window())
    uploader = Uploader(outbox, f"http://127.0.0.1:{port}", TOKEN, timeout_s=0.5, idle_s=0.05,
                        backoff_base_s=0.05, backoff_max_s=0.2, batch_windows=2)
    uploader.start()
    try:
        _wait(lambda: uploader.stats.failures >= 2)  # nobody listens: connection refused
        assert outbox.stats().rows == 4
        collector = Collector(["sleep", "503", "500"], port=port)  # a timeout, then two server errors, then success
        try:
            _wait(lambda: outbox.stats().rows == 0)
            assert collector.attempts >= 5
            assert sorted(set(collector.sequences())) == [0, 1, 2, 3]
            assert uploader.stats.uploaded == 4
        finally:
            collector.stop()
    finally:
        uploader.stop()


def test_refused_token_never_deletes(tmp_path, caplog):
    collector = Collector(["401"] * 100)
    outbox = Outbox(tmp_path / "outbox.sqlite", DEVICE)
    outbox.append(_window())
    uploader = Uploader(outbox, collector.url, "wrong-token", timeout_s=1, backoff_base_s=0.01, backoff_max_s=0.05)
    uploader.start()
    try:
        _wait(lambda: collector.attempts >= 3)
        assert outbox.stats().rows == 1
        assert "refused this device's token" in caplog.text
    finally:
        uploader.stop()
        collector.stop()


# --------------------------------------------------------------------------- the agent, end to end on loopback


def test_a_window_the_collector_refuses_is_set_aside_and_the_rest_are_delivered(tmp_path):
    """A device whose clock was wrong for one window (2017): the real collector refuses that window (422); it moves to
    the outbox's rejected table with the reason, and the windows before and after it are stored."""
    from edgekit.fleet.store import Store
    from tests.fleet.conftest import collector_in_thread

    store = Store.open(f"sqlite:///{tmp_path / 'fleet.db'}")
    token = store.add_device(DEVICE)
    outbox = Outbox(tmp_path / "outbox.sqlite", DEVICE)
    now = time.time()
    for started in (now - 120, 1_500_000_000.0, now - 60):
        outbox.append({**_window(), "started_at": started, "ended_at": started + 30, "histograms": {}})
    try:
        with collector_in_thread(store) as url:
            uploader = Uploader(outbox, url, token, timeout_s=5)
            assert uploader.upload_once() == 3
            assert uploader.upload_once() == 0
        stored, _ = store.fetch_windows(device=DEVICE)
        assert [window.sequence for window in stored] == [0, 2]
        ((sequence, reason),) = outbox.rejected()
        assert sequence == 1 and "HTTP 422" in reason and "started_at" in reason
        stats = outbox.stats()
        assert (stats.rows, stats.rejected_total) == (0, 1)
    finally:
        outbox.close()
        store.close()


def _reference_for_tiny_classifier(model_path: Path) -> DriftReference:
    import onnxruntime

    from device_agent import features as drift_features
    from edgekit.drift_reference import build_reference

    x = np.random.default_rng(5).normal(size=(2000, 4)).astype(np.float32)
    (logits,) = onnxruntime.InferenceSession(str(model_path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    found = drift_features.tensor_features({"x": x})
    found.update(drift_features.output_features(logits))
    return build_reference(found, task="tensor", labels=["cat", "dog", "bird"], window_size=40, min_window_size=10,
                           bootstrap_windows=100)


def test_agent_sends_windows_and_exposes_drift_metrics(tmp_path):
    from device_agent.bundle import write_bundle
    from device_agent.keys import load_private_key
    from tests.support.agent import live_agent
    from tests.support.bundles import tiny_manifest, tiny_payload

    collector = Collector()
    token_file = tmp_path / "device.token"
    token_file.write_text(TOKEN)
    workdir = tmp_path / "agent"
    workdir.mkdir()
    try:
        with live_agent(workdir, telemetry_url=collector.url, device_id=DEVICE, device_token_file=token_file,
                        window_size=40, window_seconds=3600) as agent:
            payload = tiny_payload(tmp_path / "payload")
            reference = _reference_for_tiny_classifier(payload["model.onnx"])
            manifest = tiny_manifest().model_copy(update={"drift_reference": reference.model_dump(mode="json")})
            bundle = tmp_path / "tiny.ekb"
            write_bundle(bundle, manifest, payload, load_private_key(workdir / "keys" / "edgekit.key"))
            answer = httpx.post(f"{agent.url}/admin/models", content=bundle.read_bytes(), headers=agent.admin_headers, timeout=60)
            assert answer.status_code == 200, answer.text

            def infer(rows: np.ndarray) -> None:
                body = {"inputs": [{"name": "x", "shape": list(rows.shape), "datatype": "FP32", "data": rows.ravel().tolist()}]}
                assert httpx.post(f"{agent.url}/v2/models/tiny-classifier/infer", json=body).status_code == 200

            rng = np.random.default_rng(9)
            for _ in range(40):
                infer(rng.normal(size=(1, 4)).astype(np.float32))
            _wait(lambda: len(collector.sequences()) >= 1)
            for _ in range(80):  # far outside the reference: two drifting windows make an alert
                infer(rng.normal(6, 1, size=(1, 4)).astype(np.float32))
            _wait(lambda: len(collector.sequences()) >= 3)
            metrics = httpx.get(f"{agent.url}/metrics").text
            assert 'edgekit_drift_alert{model="tiny-classifier",version="1.0.0"} 1' in metrics
            assert 'edgekit_drift_psi{model="tiny-classifier",version="1.0.0",feature="input.x.0"}' in metrics
            assert "edgekit_drift_outbox_windows 0" in metrics
        windows = [w for batch in collector.batches for w in batch["windows"]]
        assert [w["sequence"] for w in windows][:3] == [0, 1, 2]
        assert not windows[0]["drifting"]
        assert windows[1]["drifting"] and windows[2]["alert"]
        assert any(feature.startswith("input.x.") for feature in windows[2]["top_features"])
        assert windows[0]["requests"] == 40 and windows[0]["model"] == {"name": "tiny-classifier", "version": "1.0.0"}
        assert set(collector.batches[0]["references"]) == {windows[0]["reference_sha256"]}
    finally:
        collector.stop()


def test_agent_settings_name_what_telemetry_needs(tmp_path):
    from device_agent.config import load_settings
    from device_agent.errors import UserError

    with pytest.raises(UserError, match="telemetry_url needs device_id and device_token_file"):
        load_settings(None, {"state_dir": tmp_path, "keyring_dir": tmp_path, "telemetry_url": "http://127.0.0.1:1"})
