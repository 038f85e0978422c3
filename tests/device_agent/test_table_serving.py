"""Tabular models take raw rows (JSON objects of column → value); the device encodes them as the bundle says."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import httpx
import numpy as np
import onnxruntime
import pytest
import tritonclient.http as triton

from device_agent.keys import load_private_key
from device_agent.preprocess import TableEncoder
from device_agent.protocol import HEADER_LENGTH
from tests.support.agent import LiveAgent, live_agent
from tests.support.bundles import TABLE_LABELS, tiny_table_rows, tiny_table_spec, write_table_classifier, write_tiny_table_bundle
from tests.support.network import free_port

MODEL = "tiny-table"
MAX_ROWS = 8
ROWS = [
    {"age": 63, "hours per week": 50.5, "job": "manager"},
    {"age": 18.5, "job": "clerk"},  # hours missing: the training median
    {"age": None, "hours per week": 20, "job": "astronaut"},  # age missing, a job never seen: "other"
]


def _install(agent: LiveAgent, bundle: Path) -> None:
    answer = httpx.post(f"{agent.url}/admin/models", content=bundle.read_bytes(), headers=agent.admin_headers, timeout=60)
    assert answer.status_code == 200, answer.text


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("agent")
    with live_agent(workdir, max_rows_per_request=MAX_ROWS, max_json_bytes=64 << 10) as running:
        bundle = workdir / "bundles" / "table.ekb"
        bundle.parent.mkdir()
        write_tiny_table_bundle(bundle, load_private_key(workdir / "keys" / "edgekit.key"))
        _install(running, bundle)
        yield running


@pytest.fixture(scope="module")
def expected(agent: LiveAgent):
    """The bundle's model run in-process on rows encoded by the same TableEncoder: what every answer must equal."""
    session = onnxruntime.InferenceSession(str(agent.workdir / "bundles" / "table-payload" / "model.onnx"),
                                           providers=["CPUExecutionProvider"])
    encoder = TableEncoder(tiny_table_spec())
    return lambda rows: session.run(["logits"], {"features": encoder(rows)})[0]


def _rows_input(data: list, shape: list[int] | None = None) -> dict:
    return {"name": "rows", "datatype": "BYTES", "shape": shape or [len(data)], "data": data}


def _infer(agent: LiveAgent, body: dict) -> httpx.Response:
    return httpx.post(f"{agent.url}/v2/models/{MODEL}/infer", json=body, timeout=30)


def _logits(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    (output,) = response.json()["outputs"]
    return np.asarray(output["data"], np.float32).reshape(output["shape"])


def test_metadata_lists_the_raw_rows_input_and_its_columns(agent: LiveAgent):
    metadata = triton.InferenceServerClient(agent.address).get_model_metadata(MODEL)
    rows, features = metadata["inputs"]
    assert rows == {"name": "rows", "datatype": "BYTES", "shape": [-1], "parameters": {"columns": [
        {"name": "age", "kind": "numeric"}, {"name": "hours per week", "kind": "numeric"}, {"name": "job", "kind": "categorical"},
    ]}}
    assert features == {"name": "features", "datatype": "FP32", "shape": [-1, tiny_table_spec().width]}


def test_rows_as_json_objects_and_as_json_texts_give_the_models_answer(agent: LiveAgent, expected):
    as_objects = _logits(_infer(agent, {"inputs": [_rows_input(ROWS)]}))
    as_texts = _logits(_infer(agent, {"inputs": [_rows_input([json.dumps(row) for row in ROWS])]}))
    mixed = _logits(_infer(agent, {"inputs": [_rows_input([ROWS[0], json.dumps(ROWS[1]), ROWS[2]])]}))
    np.testing.assert_allclose(as_objects, expected(ROWS), rtol=1e-5, atol=1e-6)
    assert np.array_equal(as_objects, as_texts) and np.array_equal(as_objects, mixed)


def test_classification_extension_names_the_labels(agent: LiveAgent, expected):
    body = {"inputs": [_rows_input(ROWS)], "outputs": [{"name": "logits", "parameters": {"classification": 2}}]}
    response = _infer(agent, body)
    assert response.status_code == 200, response.text
    (output,) = response.json()["outputs"]
    assert output["datatype"] == "BYTES" and output["shape"] == [3, 2]
    best = expected(ROWS).argmax(axis=1)
    for row, index in enumerate(best):
        score, got_index, label = output["data"][2 * row].split(":")
        assert (int(got_index), label) == (index, TABLE_LABELS[index])
    assert output["data"][0].endswith(":high") and output["data"][2].endswith(":low")  # the model leans on age


def test_binary_extension_with_bytes_rows(agent: LiveAgent, expected):
    client = triton.InferenceServerClient(agent.address)
    texts = np.array([json.dumps(row).encode() for row in ROWS], dtype=object)
    tensor = triton.InferInput("rows", [len(ROWS)], "BYTES")
    tensor.set_data_from_numpy(texts, binary_data=True)
    result = client.infer(MODEL, [tensor], outputs=[triton.InferRequestedOutput("logits", binary_data=True)])
    np.testing.assert_allclose(result.as_numpy("logits"), expected(ROWS), rtol=1e-5, atol=1e-6)


def test_the_features_tensor_is_still_accepted(agent: LiveAgent, expected):
    features = TableEncoder(tiny_table_spec())(ROWS)
    body = {"inputs": [{"name": "features", "datatype": "FP32", "shape": list(features.shape), "data": features.ravel().tolist()}]}
    np.testing.assert_allclose(_logits(_infer(agent, body)), expected(ROWS), rtol=1e-5, atol=1e-6)


def _binary_rows(*elements: bytes) -> tuple[dict, bytes]:
    blob = b"".join(struct.pack("<I", len(element)) + element for element in elements)
    header = json.dumps({"inputs": [{"name": "rows", "datatype": "BYTES", "shape": [len(elements)],
                                     "parameters": {"binary_data_size": len(blob)}}]}).encode()
    return {HEADER_LENGTH: str(len(header))}, header + blob


BAD_ROWS = {
    "unknown column": ({"inputs": [_rows_input([ROWS[0], {"age": 30, "salary": 10}])]}, 400, "row 1: unknown column(s) 'salary'"),
    "a number as text": ({"inputs": [_rows_input([{"age": "forty"}])]}, 400, "row 0, column 'age': 'forty' is not a number"),
    "a boolean for a number": ({"inputs": [_rows_input([{"hours per week": True}])]}, 400, "column 'hours per week'"),
    "a row that is not an object": ({"inputs": [_rows_input([ROWS[0], 7])]}, 400, "row 1 is int, not an object"),
    "a text that is not JSON": ({"inputs": [_rows_input(["{age: 3}"])]}, 400, "row 0 is not a JSON object text"),
    "a text that is a JSON list": ({"inputs": [_rows_input(["[1, 2]"])]}, 400, "row 0 is list"),
    "more rows than the shape": ({"inputs": [_rows_input(ROWS, [2])]}, 400, "needs 2"),
    "rows over max_rows_per_request": ({"inputs": [_rows_input([ROWS[0]] * (MAX_ROWS + 1))]}, 413, "max_rows_per_request"),
    "no rows": ({"inputs": [_rows_input([])]}, 400, "empty dimension"),
    "rows of rank 2": ({"inputs": [_rows_input(ROWS, [3, 1])]}, 400, "the model takes [batch]"),
    "rows with the features tensor": (
        {"inputs": [_rows_input(ROWS), {"name": "features", "datatype": "FP32", "shape": [1, 6], "data": [0.0] * 6}]},
        400, "unknown input 'features'",
    ),
    "rows as FP32": ({"inputs": [{"name": "rows", "datatype": "FP32", "shape": [1], "data": [1.0]}]}, 400, "the model takes BYTES"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS), ids=list(BAD_ROWS))
def test_bad_rows_are_refused_naming_the_row_and_column(agent: LiveAgent, case: str):
    body, status, fragment = BAD_ROWS[case]
    response = _infer(agent, body)
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]


@pytest.mark.parametrize("elements, status, fragment", [
    ((json.dumps(ROWS[0]).encode(), b"\xff\xfe{"), 400, "row 1 is not a JSON object text"),
    ((b"[" * 20_000,), 400, "row 0 is not a JSON object text"),
    ((json.dumps({"job": "x" * (70 << 10)}).encode(),), 413, "max_json_bytes"),
])
def test_bad_binary_rows_are_refused(agent: LiveAgent, elements, status, fragment):
    headers, body = _binary_rows(*elements)
    response = httpx.post(f"{agent.url}/v2/models/{MODEL}/infer", content=body, headers=headers, timeout=30)
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]


def test_a_number_too_large_for_a_float_is_refused(agent: LiveAgent):
    response = _infer(agent, {"inputs": [_rows_input([{"age": 10**400}])]})
    assert response.status_code == 400 and "row 0, column 'age'" in response.json()["error"]


def test_a_category_that_is_an_object_is_refused(agent: LiveAgent):
    response = _infer(agent, {"inputs": [_rows_input([{"job": {"r": 1}}])]})
    assert response.status_code == 400 and "a category is a string, number or boolean" in response.json()["error"]


def _metric(agent: LiveAgent, name: str, **labels: str) -> float:
    text = httpx.get(f"{agent.url}/metrics").text
    selector = ",".join(f'{key}="{value}"' for key, value in labels.items())
    match = re.search(rf"^{re.escape(name)}\{{{re.escape(selector)}\}} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_a_bad_row_is_counted_as_refused_not_as_a_failure(agent: LiveAgent):
    refused = _metric(agent, "edgekit_inference_refused_total", code="400")
    failures = _metric(agent, "nv_inference_request_failure", model=MODEL, version="1.0.0")
    assert _infer(agent, {"inputs": [_rows_input([{"colour": "red"}])]}).status_code == 400
    assert _metric(agent, "edgekit_inference_refused_total", code="400") == refused + 1
    assert _metric(agent, "nv_inference_request_failure", model=MODEL, version="1.0.0") == failures


# --------------------------------------------------------------------------- drift on a served table


def test_drift_on_raw_rows_is_watched_per_column(tmp_path: Path):
    from types import SimpleNamespace

    from edgekit.drift_reference import reference_from_splits

    spec = tiny_table_spec()
    model_path = write_table_classifier(tmp_path / "reference-model.onnx", spec.width)  # the same model the bundle holds
    task = SimpleNamespace(kind="tabular-classification", labels=TABLE_LABELS)
    rows = np.array(tiny_table_rows(1500, seed=3), dtype=object)  # edgekit.data.Split keeps table rows so
    reference = reference_from_splits(model_path, task, [_Split(rows[:1000]), _Split(rows[1000:])], table=spec, window_size=50)
    assert {"input.column.age", "input.column.hours_per_week", "input.category.job"} <= set(reference.features)
    assert reference.features["input.category.job"].categories == ["technician", "clerk", "manager", "other"]
    token = tmp_path / "device.token"
    token.write_text("t" * 32)
    workdir = tmp_path / "agent"
    workdir.mkdir()
    # No collector answers: windows wait in the outbox, and /metrics shows the last judged one.
    with live_agent(workdir, telemetry_url=f"http://127.0.0.1:{free_port()}", device_id="edge-1", device_token_file=token,
                    window_size=50, window_seconds=3600) as running:
        bundle = workdir / "table.ekb"
        write_tiny_table_bundle(bundle, load_private_key(workdir / "keys" / "edgekit.key"),
                                drift_reference=reference.model_dump(mode="json"))
        _install(running, bundle)
        for start in range(0, 100, 5):  # two windows of rows 40 years older than the reference's
            rows = tiny_table_rows(5, seed=100 + start, age_shift=40)
            assert _infer(running, {"inputs": [_rows_input(rows)]}).status_code == 200
        labels = {"model": MODEL, "version": "1.0.0"}
        assert _metric(running, "edgekit_drift_feature_drifting", **labels, feature="input.column.age") == 1
        assert _metric(running, "edgekit_drift_feature_drifting", **labels, feature="input.category.job") == 0
        assert _metric(running, "edgekit_drift_alert", **labels) == 1


class _Split:
    """edgekit.data.Split as reference_from_splits reads it: inputs (here table rows) and a length."""

    def __init__(self, inputs: list) -> None:
        self.inputs = inputs

    def __len__(self) -> int:
        return len(self.inputs)
