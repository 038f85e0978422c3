"""Spectral models take raw sensor windows; the device computes their spectral features as the bundle says."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import numpy as np
import onnxruntime
import pytest
import tritonclient.http as triton

from device_agent.keys import load_private_key
from device_agent.preprocess import spectral_features
from device_agent.protocol import HEADER_LENGTH
from tests.support.agent import LiveAgent, live_agent
from tests.support.bundles import (
    SPECTRAL_LABELS, tiny_spectral_spec, tiny_spectral_windows, write_spectral_classifier, write_tiny_spectral_bundle,
)
from tests.support.network import free_port

MODEL = "tiny-spectral"
WINDOWS = tiny_spectral_windows(3, seed=7)


def _install(agent: LiveAgent, bundle: Path) -> None:
    answer = httpx.post(f"{agent.url}/admin/models", content=bundle.read_bytes(), headers=agent.admin_headers, timeout=60)
    assert answer.status_code == 200, answer.text


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("agent")
    with live_agent(workdir, max_rows_per_request=8) as running:
        bundle = workdir / "bundles" / "spectral.ekb"
        bundle.parent.mkdir()
        write_tiny_spectral_bundle(bundle, load_private_key(workdir / "keys" / "edgekit.key"))
        _install(running, bundle)
        yield running


@pytest.fixture(scope="module")
def expected(agent: LiveAgent):
    """The bundle's model run in-process on spectral_features of the windows: what every answer must equal."""
    session = onnxruntime.InferenceSession(str(agent.workdir / "bundles" / "spectral-payload" / "model.onnx"),
                                           providers=["CPUExecutionProvider"])
    return lambda windows: session.run(["logits"], {"features": spectral_features(windows, tiny_spectral_spec().bands)})[0]


def _tensor(name: str, array: np.ndarray, shape: list[int] | None = None) -> dict:
    return {"name": name, "datatype": "FP32", "shape": shape or list(array.shape), "data": array.ravel().tolist()}


def _infer(agent: LiveAgent, body: dict) -> httpx.Response:
    # json.dumps writes NaN as the agent's JSON parser reads it; httpx's json= refuses it.
    return httpx.post(f"{agent.url}/v2/models/{MODEL}/infer", content=json.dumps(body), timeout=30,
                      headers={"Content-Type": "application/json"})


def _logits(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    (output,) = response.json()["outputs"]
    return np.asarray(output["data"], np.float32).reshape(output["shape"])


def test_metadata_lists_the_raw_series_input_first(agent: LiveAgent):
    spec = tiny_spectral_spec()
    metadata = triton.InferenceServerClient(agent.address).get_model_metadata(MODEL)
    series, features = metadata["inputs"]
    assert series == {"name": "series", "datatype": "FP32", "shape": [-1, spec.channels, spec.steps], "parameters": {"bands": 4}}
    assert features == {"name": "features", "datatype": "FP32", "shape": [-1, spec.width]}


def test_raw_windows_as_json_give_the_models_answer(agent: LiveAgent, expected):
    answer = _logits(_infer(agent, {"inputs": [_tensor("series", WINDOWS)]}))
    np.testing.assert_allclose(answer, expected(WINDOWS), rtol=1e-5, atol=1e-5)


def test_raw_windows_with_the_binary_extension_and_classification(agent: LiveAgent, expected):
    client = triton.InferenceServerClient(agent.address)
    tensor = triton.InferInput("series", list(WINDOWS.shape), "FP32")
    tensor.set_data_from_numpy(WINDOWS, binary_data=True)
    result = client.infer(MODEL, [tensor], outputs=[triton.InferRequestedOutput("logits", binary_data=True)])
    np.testing.assert_allclose(result.as_numpy("logits"), expected(WINDOWS), rtol=1e-5, atol=1e-5)
    classified = client.infer(MODEL, [tensor], outputs=[triton.InferRequestedOutput("logits", class_count=1)])
    best = expected(WINDOWS).argmax(axis=1)
    labels = [entry.decode().split(":")[2] for entry in classified.as_numpy("logits").ravel()]
    assert labels == [SPECTRAL_LABELS[index] for index in best]


def test_the_features_tensor_is_still_accepted(agent: LiveAgent, expected):
    features = spectral_features(WINDOWS, tiny_spectral_spec().bands)
    np.testing.assert_allclose(_logits(_infer(agent, {"inputs": [_tensor("features", features)]})), expected(WINDOWS),
                               rtol=1e-5, atol=1e-5)


def _nan_windows() -> np.ndarray:
    windows = WINDOWS.copy()
    windows[1, 2, 5] = np.nan
    return windows


BAD_WINDOWS = {
    "too few steps": ({"inputs": [_tensor("series", WINDOWS[:, :, :16])]},
                      "has shape [3, 3, 16]; the model takes [batch, 3, 32]"),
    "too many channels": ({"inputs": [_tensor("series", np.zeros((1, 4, 32), np.float32))]},
                          "has shape [1, 4, 32]; the model takes [batch, 3, 32]"),
    "a window without its batch": ({"inputs": [_tensor("series", WINDOWS[0])]},
                                   "has shape [3, 32]; the model takes [batch, 3, 32]"),
    "windows as INT32": ({"inputs": [{"name": "series", "datatype": "INT32", "shape": [1, 3, 32], "data": [0] * 96}]},
                         "the model takes FP32"),
    "windows with the features tensor": (
        {"inputs": [_tensor("series", WINDOWS), _tensor("features", np.zeros((3, tiny_spectral_spec().width), np.float32))]},
        "unknown input 'features'"),
    "a NaN in JSON": ({"inputs": [_tensor("series", _nan_windows())]}, "NaN or infinite"),
    "an infinite value": ({"inputs": [_tensor("series", np.where(np.arange(96).reshape(1, 3, 32) == 9, 1e39, 0.0))]},
                          "NaN or infinite"),
}


@pytest.mark.parametrize("case", list(BAD_WINDOWS), ids=list(BAD_WINDOWS))
def test_bad_windows_are_refused_naming_what_is_wrong(agent: LiveAgent, case: str):
    body, fragment = BAD_WINDOWS[case]
    response = _infer(agent, body)
    assert response.status_code == 400, response.text
    assert fragment in response.json()["error"]


def _metric(agent: LiveAgent, name: str, **labels: str) -> float:
    text = httpx.get(f"{agent.url}/metrics").text
    selector = ",".join(f'{key}="{value}"' for key, value in labels.items())
    match = re.search(rf"^{re.escape(name)}\{{{re.escape(selector)}\}} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_a_nan_window_is_refused_and_counted_as_refused(agent: LiveAgent):
    refused = _metric(agent, "edgekit_inference_refused_total", code="400")
    failures = _metric(agent, "nv_inference_request_failure", model=MODEL, version="1.0.0")
    windows = _nan_windows()
    header = json.dumps({"inputs": [{"name": "series", "datatype": "FP32", "shape": list(windows.shape),
                                     "parameters": {"binary_data_size": windows.nbytes}}]}).encode()
    response = httpx.post(f"{agent.url}/v2/models/{MODEL}/infer", content=header + windows.tobytes(),
                          headers={HEADER_LENGTH: str(len(header))}, timeout=30)
    assert response.status_code == 400 and "NaN or infinite" in response.json()["error"], response.text
    assert _metric(agent, "edgekit_inference_refused_total", code="400") == refused + 1
    assert _metric(agent, "nv_inference_request_failure", model=MODEL, version="1.0.0") == failures


# --------------------------------------------------------------------------- drift on a served spectral model


class _Split:
    """edgekit.data.Split as reference_from_splits reads it: inputs (here raw windows) and a length."""

    def __init__(self, inputs: np.ndarray) -> None:
        self.inputs = inputs

    def __len__(self) -> int:
        return len(self.inputs)


def _reference(tmp_path: Path, window_size: int = 50):
    from types import SimpleNamespace

    from edgekit.drift_reference import reference_from_splits

    spec = tiny_spectral_spec()
    model_path = write_spectral_classifier(tmp_path / "reference-model.onnx", spec.width)  # the same model the bundle holds
    task = SimpleNamespace(kind="tensor", labels=SPECTRAL_LABELS)
    windows = tiny_spectral_windows(1000, seed=3)
    return reference_from_splits(model_path, task, [_Split(windows[:700]), _Split(windows[700:])], spectral=spec,
                                 window_size=window_size)


def test_the_reference_watches_the_raw_windows_and_the_models_outputs(tmp_path: Path):
    reference = _reference(tmp_path)
    channels = {f"input.series.{c}.{stat}" for c in range(3) for stat in ("mean", "std", "centroid")}
    assert set(reference.features) == channels | {"output.predicted_class", "output.top_probability", "output.entropy"}
    assert reference.features["output.predicted_class"].categories == SPECTRAL_LABELS


def test_the_reference_refuses_windows_of_another_shape_and_another_input_name(tmp_path: Path):
    from types import SimpleNamespace

    from edgekit.drift_reference import reference_from_splits

    spec = tiny_spectral_spec()
    model_path = write_spectral_classifier(tmp_path / "model.onnx", spec.width)
    task = SimpleNamespace(kind="tensor", labels=SPECTRAL_LABELS)
    with pytest.raises(ValueError, match=r"must be \[n, 3, 32\].*got \[10, 3, 16\]"):
        reference_from_splits(model_path, task, [_Split(tiny_spectral_windows(10)[:, :, :16])], spectral=spec)
    with pytest.raises(ValueError, match="'series' input on the device, not 'windows'"):
        reference_from_splits(model_path, task, [_Split(tiny_spectral_windows(10))], spectral=spec, tensor_input="windows")


def test_drift_on_raw_windows_is_watched_per_channel(tmp_path: Path):
    reference = _reference(tmp_path)
    token = tmp_path / "device.token"
    token.write_text("t" * 32)
    workdir = tmp_path / "agent"
    workdir.mkdir()
    # No collector answers: windows wait in the outbox, and /metrics shows the last judged one.
    with live_agent(workdir, telemetry_url=f"http://127.0.0.1:{free_port()}", device_id="edge-1", device_token_file=token,
                    window_size=50, window_seconds=3600) as running:
        bundle = workdir / "spectral.ekb"
        write_tiny_spectral_bundle(bundle, load_private_key(workdir / "keys" / "edgekit.key"),
                                   drift_reference=reference.model_dump(mode="json"))
        _install(running, bundle)
        for start in range(0, 100, 5):  # two windows of sensor windows whose channel 0 sits 3 units higher
            windows = tiny_spectral_windows(5, seed=100 + start, offset=3.0)
            assert _infer(running, {"inputs": [_tensor("series", windows)]}).status_code == 200
        features = spectral_features(WINDOWS, tiny_spectral_spec().bands)  # no windows to watch: output features only
        assert _infer(running, {"inputs": [_tensor("features", features)]}).status_code == 200
        labels = {"model": MODEL, "version": "1.0.0"}
        assert _metric(running, "edgekit_drift_feature_drifting", **labels, feature="input.series.0.mean") == 1
        assert _metric(running, "edgekit_drift_feature_drifting", **labels, feature="input.series.1.mean") == 0
        assert _metric(running, "edgekit_drift_alert", **labels) == 1
