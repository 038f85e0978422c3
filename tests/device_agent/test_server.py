"""The device agent's HTTP server, end to end: a real uvicorn server, real ONNX Runtime, tritonclient and raw HTTP."""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from device_agent.protocol import HEADER_LENGTH
from tests.support.agent import ADMIN_TOKEN, MODEL, LiveAgent, live_agent
from tests.support.bundles import LABELS, build_corpus
from tests.support.network import free_port


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory):
    """One agent serving the tiny classifier 1.0.0; tests here may read and infer, and restore what they change."""
    settings = {"max_request_bytes": 1 << 20, "max_batch_delay_ms": 10.0}
    with live_agent(tmp_path_factory.mktemp("agent"), **settings) as running:
        assert running.install("1.0.0").status_code == 200
        yield running


@pytest.fixture
def fresh_agent(tmp_path: Path):
    """An agent of its own, for tests that install, activate and roll back."""
    with live_agent(tmp_path, max_body_bytes=1 << 20) as running:
        assert running.install("1.0.0").status_code == 200
        yield running


@pytest.fixture(scope="module")
def client(agent: LiveAgent):
    return triton.InferenceServerClient(agent.address, concurrency=4)


@pytest.fixture(scope="module")
def reference(agent: LiveAgent):
    """The same model file run in-process: what every answer must equal."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(agent.model_file("1.0.0")), providers=["CPUExecutionProvider"])
    return lambda x: session.run(["logits"], {"x": x})[0]


def _batch(rows: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, 4)).astype(np.float32)


def _input(x: np.ndarray, binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    return tensor


# --------------------------------------------------------------------------- health and metadata


def test_server_is_live_ready_and_describes_itself(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    metadata = client.get_server_metadata()
    assert metadata["name"] == "edgekit-agent"
    assert set(metadata["extensions"]) == {"binary_tensor_data", "classification", "model_repository"}


def test_model_metadata_uses_minus_one_for_symbolic_dimensions(client):
    metadata = client.get_model_metadata(MODEL)
    assert metadata["platform"] == "onnxruntime_onnx"
    assert metadata["versions"] == ["1.0.0"]
    assert metadata["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert metadata["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 3]}]
    assert client.get_model_metadata(MODEL, model_version="1.0.0") == metadata


def test_model_readiness(client):
    assert client.is_model_ready(MODEL)
    assert client.is_model_ready(MODEL, model_version="1.0.0")
    assert not client.is_model_ready(MODEL, model_version="9.9.9")
    assert not client.is_model_ready("no-such-model")


# --------------------------------------------------------------------------- inference


def test_binary_inputs_give_onnx_runtimes_answer(client, reference):
    x = _batch(3)
    result = client.infer(MODEL, [_input(x)], request_id="42")
    np.testing.assert_allclose(result.as_numpy("logits"), reference(x), rtol=1e-6, atol=1e-6)
    response = result.get_response()
    assert response["id"] == "42" and response["model_version"] == "1.0.0"
    # No outputs asked for: tritonclient asks for all of them in binary.
    assert "binary_data_size" in result.get_output("logits")["parameters"]


def test_json_inputs_and_json_outputs(client, reference):
    x = _batch(2, seed=1)
    outputs = [triton.InferRequestedOutput("logits", binary_data=False)]
    result = client.infer(MODEL, [_input(x, binary=False)], outputs=outputs)
    assert "data" in result.get_output("logits")
    np.testing.assert_allclose(result.as_numpy("logits"), reference(x), rtol=1e-6, atol=1e-6)


def test_json_inputs_with_binary_outputs(client, reference):
    x = _batch(4, seed=2)
    outputs = [triton.InferRequestedOutput("logits", binary_data=True)]
    result = client.infer(MODEL, [_input(x, binary=False)], outputs=outputs, model_version="1.0.0")
    assert result.get_output("logits")["parameters"]["binary_data_size"] == 4 * 3 * 4
    np.testing.assert_allclose(result.as_numpy("logits"), reference(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("binary", [True, False])
def test_classification_gives_top_k_with_labels(client, reference, binary):
    x = _batch(3, seed=3)
    outputs = [triton.InferRequestedOutput("logits", binary_data=binary, class_count=2)]
    classes = client.infer(MODEL, [_input(x)], outputs=outputs).as_numpy("logits")
    assert classes.shape == (3, 2)
    expected = reference(x)
    for row, entries in zip(expected, classes):
        top = np.argsort(-row, kind="stable")[:2]
        for entry, index in zip(entries, top):
            text = entry.decode() if isinstance(entry, bytes) else entry
            score, position, label = text.split(":")
            assert (int(position), label) == (index, LABELS[index])
            assert float(score) == pytest.approx(row[index], abs=1e-5)


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests(client, reference, algorithm):
    x = _batch(2, seed=4)
    result = client.infer(MODEL, [_input(x)], request_compression_algorithm=algorithm)
    np.testing.assert_allclose(result.as_numpy("logits"), reference(x), rtol=1e-6, atol=1e-6)


def test_unknown_model_and_version_are_404(client):
    for model, version in [("no-such-model", ""), (MODEL, "7.0.0")]:
        with pytest.raises(InferenceServerException) as raised:
            client.infer(model, [_input(_batch(1))], model_version=version)
        assert raised.value.status() == "404"


def test_concurrent_requests_are_batched_and_each_gets_its_rows(agent: LiveAgent, reference):
    def exec_count() -> int:
        return int(_metric(agent, "nv_inference_exec_count", model=MODEL, version="1.0.0"))

    before, results, errors = exec_count(), {}, []
    barrier = threading.Barrier(16)

    def one(seed: int) -> None:
        try:
            local = triton.InferenceServerClient(agent.address)
            x = _batch(1, seed=100 + seed)
            barrier.wait()
            results[seed] = (x, local.infer(MODEL, [_input(x)]).as_numpy("logits"))
        except Exception as error:  # reported below, not lost in the thread
            errors.append(error)

    threads = [threading.Thread(target=one, args=(seed,)) for seed in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors
    for x, logits in results.values():
        np.testing.assert_allclose(logits, reference(x), rtol=1e-6, atol=1e-6)
    assert exec_count() - before < 16


# --------------------------------------------------------------------------- bad requests: 4xx with {"error"}, never 5xx


def _binary(header: dict, *blobs: bytes, length: int | None = None) -> tuple[dict, bytes]:
    head = json.dumps(header).encode()
    return {HEADER_LENGTH: str(len(head) if length is None else length)}, head + b"".join(blobs)


def _json(document) -> tuple[dict, bytes]:
    return {"Content-Type": "application/json"}, json.dumps(document).encode()


def _x(shape, data=None, datatype="FP32", **extra) -> dict:
    tensor = {"name": "x", "shape": shape, "datatype": datatype, **extra}
    if data is not None:
        tensor["data"] = data
    return tensor


FOUR = [0.5, 1.0, 1.5, 2.0]
FLOATS = np.arange(4, dtype=np.float32).tobytes()

BAD_REQUESTS = {
    "wrong input name": (_json({"inputs": [{**_x([1, 4], FOUR), "name": "y"}]}), 400, "unknown input 'y'"),
    "no inputs": (_json({"inputs": []}), 400, "inputs"),
    "missing input": (_json({"outputs": [{"name": "logits"}]}), 400, "inputs"),
    "wrong datatype": (_json({"inputs": [_x([1, 4], [1, 2, 3, 4], "INT32")]}), 400, "the model takes FP32"),
    "fixed dimension differs": (_json({"inputs": [_x([1, 5], FOUR + [1.0])]}), 400, "the model takes [batch, 4]"),
    "wrong rank": (_json({"inputs": [_x([4], FOUR)]}), 400, "the model takes [batch, 4]"),
    "element count differs": (_json({"inputs": [_x([2, 4], FOUR)]}), 400, "needs 8"),
    "nested data of the wrong size": (_json({"inputs": [_x([2, 4], [FOUR])]}), 400, "needs 8"),
    "strings for FP32": (_json({"inputs": [_x([1, 4], ["a", "b", "c", "d"])]}), 400, "must be numbers"),
    "nulls for FP32": (_json({"inputs": [_x([1, 4], [None, 1, 2, 3])]}), 400, "must be numbers"),
    "ragged data": (_json({"inputs": [_x([2, 4], [FOUR, [1.0]])]}), 400, "regularly nested"),
    "negative dimension": (_json({"inputs": [_x([-1, 4], FOUR)]}), 400, "shape"),
    "huge dimension of an empty tensor": (_json({"inputs": [_x([2**40, 4, 0], [])]}), 413, "max_rows_per_request"),
    "huge symbolic dimension": (_json({"inputs": [_x([2**40, 4], FOUR)]}), 413, "max_rows_per_request"),
    "huge fixed dimension": (_json({"inputs": [_x([1, 2**40], FOUR)]}), 400, "dimensions above"),
    "duplicate input": (_json({"inputs": [_x([1, 4], FOUR), _x([1, 4], FOUR)]}), 400, "given twice"),
    "misspelt field": (_json({"inputs": [{**_x([1, 4], FOUR), "datatyp": "FP32"}]}), 400, "datatyp"),
    "no data at all": (_json({"inputs": [_x([1, 4])]}), 400, "no data"),
    "id is not a string": (_json({"id": 42, "inputs": [_x([1, 4], FOUR)]}), 400, "id"),
    "unknown output": (_json({"inputs": [_x([1, 4], FOUR)], "outputs": [{"name": "probs"}]}), 400, "unknown output 'probs'"),
    "classification not an integer": (
        _json({"inputs": [_x([1, 4], FOUR)], "outputs": [{"name": "logits", "parameters": {"classification": "two"}}]}),
        400, "classification",
    ),
    "binary_data not a boolean": (
        _json({"inputs": [_x([1, 4], FOUR)], "outputs": [{"name": "logits", "parameters": {"binary_data": 3}}]}),
        400, "binary_data",
    ),
    "shared memory output": (
        _json({"inputs": [_x([1, 4], FOUR)], "outputs": [{"name": "logits", "parameters": {"shared_memory_region": "r"}}]}),
        400, "shared memory",
    ),
    "not JSON": (({}, b"\x00\x01 definitely not json"), 400, "not valid JSON"),
    "JSON but a list": (_json([1, 2, 3]), 400, "does not match"),
    "deeply nested JSON": (({}, b"[" * 100_000 + b"]" * 100_000), 400, "JSON"),
    "binary size does not match the shape": (
        _binary({"inputs": [_x([1, 4], parameters={"binary_data_size": 12})]}, FLOATS[:12]), 400, "needs 16",
    ),
    "binary size past the end": (
        _binary({"inputs": [_x([1, 4], parameters={"binary_data_size": 16})]}, FLOATS[:8]), 400, "runs past the end",
    ),
    "bytes after the binary inputs": (
        _binary({"inputs": [_x([1, 4], parameters={"binary_data_size": 16})]}, FLOATS, b"extra"), 400, "after the binary",
    ),
    "binary size negative": (
        _binary({"inputs": [_x([1, 4], parameters={"binary_data_size": -16})]}, FLOATS), 400, "negative",
    ),
    "binary size not an integer": (
        _binary({"inputs": [_x([1, 4], parameters={"binary_data_size": "16"})]}, FLOATS), 400, "integer",
    ),
    "binary and data both": (
        _binary({"inputs": [_x([1, 4], FOUR, parameters={"binary_data_size": 16})]}, FLOATS), 400, "both",
    ),
    "binary input without the header": (
        _json({"inputs": [_x([1, 4], parameters={"binary_data_size": 16})]}), 400, "header is missing",
    ),
    "binary data appended without the header": (
        ({}, json.dumps({"inputs": [_x([1, 4], parameters={"binary_data_size": 16})]}).encode() + FLOATS), 400, "not valid JSON",
    ),
    "header length not a number": (({HEADER_LENGTH: "lots"}, b"{}"), 400, "must be an integer"),
    "header length past the body": (_binary({"inputs": [_x([1, 4], FOUR)]}, length=10_000), 400, "the body has"),
    "gzip that is not gzip": (({"Content-Encoding": "gzip"}, b"not gzip at all"), 400, "not valid gzip"),
    "truncated gzip": (({"Content-Encoding": "gzip"}, gzip.compress(b'{"inputs": []}' * 100)[:40]), 400, "truncated"),
    "unsupported encoding": (({"Content-Encoding": "br"}, b"{}"), 415, "not supported"),
    "a gzip bomb": (({"Content-Encoding": "gzip"}, gzip.compress(bytes(8 << 20))), 413, "limit"),
    "deflate bomb": (({"Content-Encoding": "deflate"}, zlib.compress(bytes(8 << 20))), 413, "limit"),
    "body over max_request_bytes": (({}, bytes(2 << 20)), 413, "limit"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS), ids=list(BAD_REQUESTS))
def test_bad_requests_are_refused_with_a_reason(agent: LiveAgent, case: str):
    (headers, body), status, fragment = BAD_REQUESTS[case]
    response = httpx.post(f"{agent.url}/v2/models/{MODEL}/infer", content=body, headers=headers, timeout=30)
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]


@pytest.mark.parametrize(
    "path, status",
    [
        ("/v2/models/no-such-model/infer", 404),
        (f"/v2/models/{MODEL}/versions/2.0.0/infer", 404),
        (f"/v2/models/{'a' * 300}/infer", 404),
        (f"/v2/models/{MODEL}/versions/..%2F..%2Fx/infer", 404),
        ("/v2/no/such/route", 404),
    ],
)
def test_unknown_models_and_routes_are_404_with_an_error(agent: LiveAgent, path: str, status: int):
    response = httpx.post(f"{agent.url}{path}", json={"inputs": [_x([1, 4], FOUR)]})
    assert response.status_code == status
    assert "error" in response.json()


# --------------------------------------------------------------------------- repository extension


def test_repository_index_unload_and_load(agent: LiveAgent, client):
    assert client.get_model_repository_index() == [{"name": MODEL, "version": "1.0.0", "state": "READY", "reason": ""}]
    client.unload_model(MODEL, headers=agent.admin_headers)
    try:
        assert not client.is_model_ready(MODEL)
        assert not client.is_server_ready(), "an active version that does not serve makes the server not ready"
        (row,) = client.get_model_repository_index()
        assert (row["state"], row["reason"]) == ("AVAILABLE", "unloaded")
        ready_only = httpx.post(f"{agent.url}/v2/repository/index", json={"ready": True}).json()
        assert ready_only == []
    finally:
        client.load_model(MODEL, headers=agent.admin_headers)
    assert client.is_model_ready(MODEL) and client.is_server_ready()


@pytest.mark.parametrize("action", ["unload", "load"])
@pytest.mark.parametrize(("token", "status"), [(None, 401), ("wrong-token-0123456789abcdef", 403)])
def test_load_and_unload_need_the_admin_token(agent: LiveAgent, action: str, token: str | None, status: int):
    """Anyone who reached the port could unload the served model (404 on ready afterwards)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = httpx.post(f"{agent.url}/v2/repository/models/{MODEL}/{action}", headers=headers)
    assert response.status_code == status, response.text
    assert httpx.get(f"{agent.url}/v2/models/{MODEL}/ready").status_code == 200


@pytest.mark.parametrize(
    "path, body, status",
    [
        ("/v2/repository/models/no-such-model/load", b"", 404),
        ("/v2/repository/models/no-such-model/unload", b"", 404),
        (f"/v2/repository/models/{MODEL}/load", json.dumps({"parameters": {"config": "{}"}}).encode(), 400),
        (f"/v2/repository/models/{MODEL}/load", b"not json", 400),
        ("/v2/repository/index", b'{"ready": "maybe"}', 400),
    ],
)
def test_repository_requests_refused(agent: LiveAgent, path: str, body: bytes, status: int):
    response = httpx.post(f"{agent.url}{path}", content=body, headers=agent.admin_headers)
    assert response.status_code == status
    assert "error" in response.json()


# --------------------------------------------------------------------------- metrics


def _metric(agent: LiveAgent, name: str, **labels: str) -> float:
    text = httpx.get(f"{agent.url}/metrics").text
    selector = "{" + ",".join(f'{key}="{value}"' for key, value in labels.items()) + "}" if labels else ""
    match = re.search(rf"^{re.escape(name + selector)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name}{selector} missing from /metrics:\n{text}"
    return float(match.group(1))


def test_metrics_use_tritons_names(agent: LiveAgent, client):
    labels = {"model": MODEL, "version": "1.0.0"}
    success, inferences = _metric(agent, "nv_inference_request_success", **labels), _metric(agent, "nv_inference_count", **labels)
    failures = _metric(agent, "nv_inference_request_failure", **labels)
    text = httpx.get(f"{agent.url}/metrics").text
    refused = float(m.group(1)) if (m := re.search(r'^edgekit_inference_refused_total\{code="400"\} (\S+)$', text, re.MULTILINE)) else 0.0
    client.infer(MODEL, [_input(_batch(5))])
    httpx.post(f"{agent.url}/v2/models/{MODEL}/infer", json={"inputs": [_x([1, 5], FOUR + [1])]})
    assert _metric(agent, "nv_inference_request_success", **labels) == success + 1
    assert _metric(agent, "nv_inference_count", **labels) == inferences + 5
    # A client's mistake (400) is not a model failure: it is counted apart.
    assert _metric(agent, "nv_inference_request_failure", **labels) == failures
    assert _metric(agent, "edgekit_inference_refused_total", code="400") == refused + 1
    for name in ("nv_inference_exec_count", "nv_inference_request_duration_us", "nv_inference_queue_duration_us",
                 "nv_inference_compute_infer_duration_us", "nv_inference_pending_request_count"):
        assert _metric(agent, name, **labels) >= 0
    assert _metric(agent, "edgekit_active_version_info", **labels) == 1
    assert _metric(agent, "edgekit_installs_total", result="success") >= 1
    assert _metric(agent, "edgekit_rollbacks_total") == 0
    assert httpx.get(f"{agent.url}/metrics").headers["content-type"].startswith("text/plain; version=0.0.4")


# --------------------------------------------------------------------------- admin API


def test_admin_needs_a_token(agent: LiveAgent):
    for method, path in [("GET", "/admin/models"), ("GET", "/admin/status"), ("POST", f"/admin/models/{MODEL}/rollback")]:
        missing = httpx.request(method, f"{agent.url}{path}")
        assert missing.status_code == 401 and "error" in missing.json()
        assert missing.headers["www-authenticate"] == "Bearer"
        basic = httpx.request(method, f"{agent.url}{path}", headers={"Authorization": "Basic dXNlcjpwYXNz"})
        assert basic.status_code == 401
        wrong = httpx.request(method, f"{agent.url}{path}", headers={"Authorization": "Bearer not-the-token"})
        assert wrong.status_code == 403 and "error" in wrong.json()


def test_admin_status_and_versions(agent: LiveAgent):
    versions = httpx.get(f"{agent.url}/admin/models", headers=agent.admin_headers).json()
    assert versions == [{"name": MODEL, "version": "1.0.0", "state": "READY", "reason": "", "active": True}]
    status = httpx.get(f"{agent.url}/admin/status", headers=agent.admin_headers).json()
    assert status["ready"] is True and status["models"] == versions
    assert status["host"]["cpu_arch"]


def test_admin_api_is_off_without_a_token_file(tmp_path: Path):
    with live_agent(tmp_path, admin_token=False) as running:
        response = httpx.get(f"{running.url}/admin/models", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert response.status_code == 403 and "admin_token_file" in response.json()["error"]


def _serves(agent: LiveAgent, version: str) -> None:
    client = triton.InferenceServerClient(agent.address)
    assert client.get_model_metadata(MODEL)["versions"] == [version]
    assert client.infer(MODEL, [_input(_batch(1))]).get_response()["model_version"] == version


def test_tampered_bundles_are_refused_and_the_old_model_keeps_serving(fresh_agent: LiveAgent, tmp_path: Path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from device_agent.keys import load_private_key

    key = load_private_key(fresh_agent.workdir / "keys" / "edgekit.key")
    corpus = {case.name: case for case in build_corpus(tmp_path / "corpus", key, Ed25519PrivateKey.generate())}
    for name in ("model-byte-flip", "manifest-byte-flip", "untrusted-key", "dotdot-entry", "not-an-archive"):
        response = httpx.post(
            f"{fresh_agent.url}/admin/models", content=corpus[name].path.read_bytes(), headers=fresh_agent.admin_headers
        )
        assert response.status_code == 400, (name, response.text)
        assert f"[{corpus[name].check.value}]" in response.json()["error"]
        _serves(fresh_agent, "1.0.0")
    assert _metric(fresh_agent, "edgekit_installs_total", result="refused") == 5


def test_install_activate_rollback_and_downgrade(fresh_agent: LiveAgent):
    assert fresh_agent.install("2.0.0").json()["version"] == "2.0.0"
    _serves(fresh_agent, "2.0.0")

    older = fresh_agent.install("1.5.0")
    assert older.status_code == 409 and "older" in older.json()["error"]
    _serves(fresh_agent, "2.0.0")
    forced = httpx.post(
        f"{fresh_agent.url}/admin/models?force=true",
        content=fresh_agent.bundle("1.5.0").read_bytes(),
        headers=fresh_agent.admin_headers,
    )
    assert forced.status_code == 409 and "anti-rollback" in forced.json()["error"]  # 1.5.0 was never on the device
    _serves(fresh_agent, "2.0.0")

    back = httpx.post(f"{fresh_agent.url}/admin/models/{MODEL}/rollback", headers=fresh_agent.admin_headers)
    assert back.status_code == 200 and back.json()["version"] == "1.0.0"
    _serves(fresh_agent, "1.0.0")
    assert _metric(fresh_agent, "edgekit_rollbacks_total") == 1

    activated = httpx.post(f"{fresh_agent.url}/admin/models/{MODEL}/activate/2.0.0", headers=fresh_agent.admin_headers)
    assert activated.status_code == 200
    _serves(fresh_agent, "2.0.0")
    assert _metric(fresh_agent, "edgekit_active_version_info", model=MODEL, version="2.0.0") == 1


def test_no_request_fails_during_an_upgrade_and_a_rollback(fresh_agent: LiveAgent):
    """Four clients infer without pause while 2.0.0 is installed (loaded and golden-checked beside 1.0.0) and then rolled
    back: the switch is atomic, so every request is answered 200 by one version or the other."""
    import threading

    statuses: list[int] = []
    versions: set[str] = set()
    stop = threading.Event()

    def infer() -> None:
        with httpx.Client(base_url=fresh_agent.url, timeout=30) as session:
            while not stop.is_set():
                response = session.post(f"/v2/models/{MODEL}/infer", json={"inputs": [_x([1, 4], FOUR)]})
                statuses.append(response.status_code)
                if response.status_code == 200:
                    versions.add(response.json()["model_version"])

    clients = [threading.Thread(target=infer) for _ in range(4)]
    for thread in clients:
        thread.start()
    try:
        time.sleep(0.3)
        assert fresh_agent.install("2.0.0").status_code == 200
        time.sleep(0.3)
        back = httpx.post(f"{fresh_agent.url}/admin/models/{MODEL}/rollback", headers=fresh_agent.admin_headers)
        assert back.status_code == 200 and back.json()["version"] == "1.0.0"
        time.sleep(0.3)
    finally:
        stop.set()
        for thread in clients:
            thread.join()
    assert len(statuses) > 50 and set(statuses) == {200}, sorted(set(statuses))
    assert versions == {"1.0.0", "2.0.0"}


@pytest.mark.parametrize(
    "path",
    [
        f"/admin/models/{MODEL}/activate/9.9.9",
        f"/admin/models/{MODEL}/activate/..",
        f"/admin/models/{'n' * 300}/activate/1.0.0",
        "/admin/models/no-such-model/rollback",
    ],
)
def test_admin_changes_to_unknown_versions_are_404(fresh_agent: LiveAgent, path: str):
    response = httpx.post(f"{fresh_agent.url}{path}", headers=fresh_agent.admin_headers)
    assert response.status_code == 404 and "error" in response.json()
    _serves(fresh_agent, "1.0.0")


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_uploads_over_the_limit_are_413(fresh_agent: LiveAgent, declared: bool):
    body = bytes(2 << 20) if declared else iter([bytes(256 << 10)] * 8)  # an iterator goes out chunked
    response = httpx.post(f"{fresh_agent.url}/admin/models", content=body, headers=fresh_agent.admin_headers)
    assert response.status_code == 413 and "max_body_bytes" in response.json()["error"]
    assert list((fresh_agent.settings.state_dir / "uploads").iterdir()) == [], "a refused upload leaves no file"
    _serves(fresh_agent, "1.0.0")


def test_chunked_inference_requests_over_the_limit_are_413(agent: LiveAgent):
    response = httpx.post(f"{agent.url}/v2/models/{MODEL}/infer", content=iter([bytes(256 << 10)] * 8))
    assert response.status_code == 413 and "max_request_bytes" in response.json()["error"]


# --------------------------------------------------------------------------- settings


REPO_ROOT = Path(__file__).resolve().parents[2]


def test_the_shipped_jetson_config_loads():
    from device_agent.config import load_settings

    settings = load_settings(REPO_ROOT / "deploy" / "agent.yaml", {})
    assert settings.state_dir == Path("/var/lib/edgekit")
    assert settings.admin_token_file == Path("/etc/edgekit/admin.token")
    assert settings.keep_versions >= 2 and settings.max_batch >= 1
    assert settings.host == "127.0.0.1"  # opening the port is the operator's choice, with the note on what protects it


def test_the_shipped_config_documents_each_limit_with_its_default():
    import yaml

    from device_agent.config import AgentSettings

    documented = {}
    for line in (REPO_ROOT / "deploy" / "agent.yaml").read_text().splitlines():
        key, _, rest = line.removeprefix("# ").partition(":")
        if line.startswith("# ") and key in AgentSettings.model_fields and rest.strip():
            documented[key] = yaml.safe_load(rest.split("#")[0])
    limits = ["max_json_bytes", "max_rows_per_request", "max_text_chars", "max_inflight_body_bytes", "max_concurrent_requests",
              "preprocess_threads", "max_header_bytes", "header_timeout_s", "keep_alive_s", "body_timeout_s", "min_body_rate",
              "max_connections"]
    assert set(limits) <= set(documented)
    for key in limits:
        assert documented[key] == AgentSettings.model_fields[key].default, key


def test_flags_override_the_file_and_relative_paths_follow_the_file(tmp_path: Path):
    from device_agent.config import load_settings

    config = tmp_path / "conf" / "agent.yaml"
    config.parent.mkdir()
    config.write_text("state_dir: state\nkeyring_dir: keyring\nport: 9000\nmax_batch: 4\n")
    settings = load_settings(config, {"port": 9100, "host": None})
    assert settings.state_dir == tmp_path / "conf" / "state"
    assert (settings.port, settings.max_batch, settings.host) == (9100, 4, "127.0.0.1")


def test_every_settings_problem_is_reported_at_once(tmp_path: Path):
    from device_agent.config import load_settings
    from device_agent.validation import ConfigError

    config = tmp_path / "agent.yaml"
    config.write_text("keyring_dir: k\nmax_batchh: 4\nport: many\nmax_batch: 0\n")
    with pytest.raises(ConfigError) as raised:
        load_settings(config, {})
    message = str(raised.value)
    assert "4 problems" in message
    assert "max_batchh: unknown field; did you mean 'max_batch'?" in message
    assert "port:" in message and "'many'" in message
    assert "max_batch: Input should be greater than or equal to 1" in message
    assert "state_dir: required field is missing; set it in the config file or pass --state-dir" in message


def test_tls_needs_both_certificate_and_key():
    from device_agent.config import load_settings
    from device_agent.validation import ConfigError

    with pytest.raises(ConfigError, match="ssl_certfile and ssl_keyfile go together"):
        load_settings(None, {"state_dir": "s", "keyring_dir": "k", "ssl_certfile": "agent.crt"})


@pytest.mark.parametrize("text, problem", [("- a\n- b\n", "must be a mapping"), ("port: [\n", "not valid YAML")])
def test_unreadable_settings_files(tmp_path: Path, text: str, problem: str):
    from device_agent.config import load_settings
    from device_agent.validation import ConfigError

    config = tmp_path / "agent.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=problem):
        load_settings(config, {})


# --------------------------------------------------------------------------- the command line


def _agent_command(*args: str) -> list[str]:
    return [sys.executable, "-c", "from device_agent.cli import main; main()", *args]


def _agent_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(_agent_command(*args), cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False)


def test_serve_and_status_from_the_command_line(tmp_path: Path, signing_key, keyring_dir: Path):
    from tests.support.bundles import write_tiny_bundle

    token = tmp_path / "admin.token"
    token.write_text(ADMIN_TOKEN)
    token.chmod(0o600)
    config = tmp_path / "agent.yaml"
    config.write_text(f"state_dir: state\nkeyring_dir: {keyring_dir}\nadmin_token_file: admin.token\nport: 1\n")
    port = free_port()
    server = subprocess.Popen(
        _agent_command("serve", "--config", str(config), "--port", str(port)), cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/v2/health/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "the agent did not start"
            time.sleep(0.1)
        bundle = tmp_path / "bundles" / "tiny.ekb"
        write_tiny_bundle(bundle, signing_key)
        installed = httpx.post(f"{url}/admin/models", content=bundle.read_bytes(), headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert installed.status_code == 200, installed.text

        status = _agent_cli("status", "--url", url)
        assert status.returncode == 0, status.stderr
        assert "edgekit-agent" in status.stdout and "ready" in status.stdout
        assert re.search(rf"{MODEL}\s+1\.0\.0\s+READY", status.stdout)
        as_json = json.loads(_agent_cli("status", "--url", url, "--json").stdout)
        assert as_json["ready"] and as_json["models"][0]["state"] == "READY"
    finally:
        server.terminate()
        _, logs = server.communicate(timeout=30)
    lines = [line for line in logs.splitlines() if line.strip()]
    assert lines, "the agent logged nothing"
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert any(record["message"].startswith("installed tiny-classifier 1.0.0") for record in records)
    assert all({"time", "level", "logger", "message"} <= set(record) for record in records)


def test_status_names_an_unreachable_agent():
    result = _agent_cli("status", "--url", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 2
    assert "cannot reach the agent" in result.stderr
