"""The time-series task: .ts and .npz read (bad files named by line), BasicMotions built to a bundle the agent serves."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgekit.cli import app
from edgekit.config import BuildConfig
from edgekit.data import DataError
from edgekit.tasks.timeseries_data import load_task_data, read_series

ROOT = Path(__file__).resolve().parents[2]
HAS_SKTIME_DATA = importlib.util.find_spec("sktime") is not None
HEADER = "# a comment\n@problemName Toy\n@univariate false\n@dimensions 2\n@equalLength true\n@seriesLength 3\n@classLabel true up down\n@data\n"


def _ts(path: Path, body: str, header: str = HEADER) -> Path:
    path.write_text(header + body)
    return path


def test_a_multivariate_ts_file_reads_as_samples_channels_steps(tmp_path):
    series, labels, declared = read_series(_ts(tmp_path / "a.ts", "1,2,3:4,5,6:up\n7,8,9:1,1,1:down\n"))
    assert series.shape == (2, 2, 3) and series.dtype == np.float32 and series[1, 0].tolist() == [7, 8, 9]
    assert labels == ["up", "down"] and declared == ["up", "down"]


@pytest.mark.parametrize(
    ("body", "header", "message"),
    [
        ("1,2,3:4,5,6:up\n1,2:4,5:down\n", HEADER, r"a\.ts:10: 2 channel\(s\) of lengths \[2\]; the first sample has 2 x 3"),
        ("1,2,3:4,?,6:up\n", HEADER, r"a\.ts:9: a value is not a number .*missing values \('\?'\) are not supported yet"),
        ("1,2,3:4,nan,6:up\n", HEADER, r"a\.ts:9: NaN or infinite values"),
        ("1,2,3:4,5,6:up\n", HEADER.replace("@dimensions 2", "@dimensions 3"), r"@dimensions 3 but the samples have 2"),
        ("1,2,3:up\n", HEADER.replace("@classLabel true up down", "@classLabel false"), r"no '@classLabel true <labels>'"),
        ("1,2,3:up\n", HEADER.replace("@equalLength true", "@equalLength false"), r"unequal length .* not supported yet"),
        ("1,2,3:up\n", "@problemName Toy\n1,2\n@data\n", r"a\.ts:2: data before @data"),
    ],
)
def test_a_bad_ts_file_is_named_with_its_line_and_the_fix(tmp_path, body, header, message):
    with pytest.raises(DataError, match=message):
        read_series(_ts(tmp_path / "a.ts", body, header))


def test_npz_series_split_stratified_and_a_single_class_refused(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "s.npz", X=rng.normal(size=(60, 3, 16)).astype(np.float32), y=np.repeat(["a", "b", "c"], 20))
    data = load_task_data(tmp_path / "s.npz", None)
    assert data.labels == ("a", "b", "c") and data.train.inputs.shape[1:] == (3, 16)
    assert len(data.train) + len(data.val) + len(data.test) == 60 and set(np.unique(data.test.labels)) == {0, 1, 2}
    np.savez(tmp_path / "one.npz", X=np.zeros((10, 16), np.float32), y=np.zeros(10))
    with pytest.raises(DataError, match=r"train has 1 class\(es\) \['0.0'\]; classification needs at least 2"):
        load_task_data(tmp_path / "one.npz", None)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"task": {"kind": "timeseries-classification"}}, "is not a time-series model; timeseries-classification takes builtin:cnn1d"),
        ({"model": {"source": "builtin:cnn1d"}}, "is a timeseries-classification model; set task.kind: timeseries-classification"),
        ({"model": {"source": "builtin:lstm"}}, "unknown built-in model 'builtin:lstm'; known: builtin:small-cnn"),
    ],
)
def test_a_model_that_does_not_fit_the_task_is_named(document, message):
    with pytest.raises(ValueError, match=message):
        BuildConfig.model_validate(document)


needs_sktime = pytest.mark.skipif(not HAS_SKTIME_DATA, reason="the sktime wheel (its BasicMotions files) is not installed: pip install sktime")


@pytest.fixture(scope="module")
def basicmotions(tmp_path_factory) -> Path:
    """``examples/basicmotions.yaml`` built once: the folder holding ``out/`` and ``cache/``."""
    root = tmp_path_factory.mktemp("basicmotions")
    result = CliRunner().invoke(app, ["build", str(ROOT / "examples" / "basicmotions.yaml"), "--out", str(root / "out"),
                                      "--cache-dir", str(root / "cache")])
    assert result.exit_code == 0, result.output
    return root


@pytest.mark.slow
@needs_sktime
def test_basicmotions_builds_a_bundle_the_agent_serves_from_raw_windows(basicmotions, tmp_path):
    import httpx

    from device_agent.bundle import open_bundle
    from device_agent.keys import Keyring
    from tests.support.agent import AgentProcess

    report = json.loads((basicmotions / "out" / "x86-64-cpu" / "report.json").read_text())
    assert report["passed"] and report["metrics"]["final"]["accuracy"] >= 0.97, report["metrics"]["final"]
    assert report["quantization"]["scheme"] == "static_qdq" and report["precision"] == "int8"

    keyring = tmp_path / "keyring"
    keyring.mkdir()
    shutil.copy(basicmotions / "cache" / "dev-key" / "edgekit.pub", keyring / "dev.pub")
    bundle = Path(report["bundle"])
    agent = AgentProcess(tmp_path, keyring).start()
    try:
        flashed = CliRunner().invoke(app, ["flash", str(bundle), "--device", agent.url, "--token-file", str(tmp_path / "admin.token")])
        assert flashed.exit_code == 0, flashed.output
        data = load_task_data(Path("sktime:BasicMotions/BasicMotions_TRAIN.ts"), Path("sktime:BasicMotions/BasicMotions_TEST.ts"))
        windows = data.test.inputs[:8]
        request = {"inputs": [{"name": "series", "shape": list(windows.shape), "datatype": "FP32", "data": windows.ravel().tolist()}]}
        answer = httpx.post(f"{agent.url}/v2/models/basicmotions/infer", json=request, timeout=30)
        assert answer.status_code == 200, answer.text
        logits = np.asarray(answer.json()["outputs"][0]["data"], np.float32).reshape(8, len(data.labels))
        assert (logits.argmax(-1) == data.test.labels[:8]).mean() >= 0.875, "the device classifies raw windows as the build did"
        with open_bundle(bundle, Keyring.load(keyring)) as opened:
            assert opened.manifest.inputs[0].name == "series" and opened.manifest.inputs[0].shape[1:] == [6, 100]
        wrong = {"inputs": [{"name": "series", "shape": [1, 6, 50], "datatype": "FP32", "data": [0.0] * 300}]}
        refused = httpx.post(f"{agent.url}/v2/models/basicmotions/infer", json=wrong, timeout=30)
        assert refused.status_code == 400 and "series" in refused.text and "100" in refused.text, refused.text
    finally:
        agent.stop()


@pytest.mark.slow
@needs_sktime
def test_a_sensor_offset_on_one_channel_is_judged_drift_by_the_devices_monitor(basicmotions):
    """The bundle's reference (build) and the device's window features come from the same tensor_features."""
    from device_agent.drift import DriftMonitor, MonitorSettings
    from device_agent.features import output_features, tensor_features
    from device_agent.telemetry_schema import DriftReference

    package = basicmotions / "out" / "x86-64-cpu" / "passes" / "07-package"
    reference = DriftReference.model_validate_json((package / "drift_reference.json").read_text())
    assert {f"input.series.{c}.{s}" for c in range(6) for s in ("mean", "std")} <= set(reference.features)

    import onnxruntime

    session = onnxruntime.InferenceSession(str(package.parent / "04-quantize" / "model.onnx"))
    data = load_task_data(Path("sktime:BasicMotions/BasicMotions_TRAIN.ts"), Path("sktime:BasicMotions/BasicMotions_TEST.ts"))
    windows = np.concatenate([data.val.inputs, data.test.inputs])

    def judged(batch: np.ndarray) -> dict:
        monitor = DriftMonitor(reference, None, MonitorSettings(window_size=len(batch), min_window_size=len(batch)))
        features = tensor_features({"series": batch}) | output_features(session.run(None, {"series": batch})[0])
        return monitor.observe(features, len(batch), latency_ms=1.0)

    assert not judged(windows)["drifting"], "the reference rows themselves do not drift"
    shifted = windows.copy()
    shifted[:, 0] += 3 * windows[:, 0].std()  # an accelerometer axis offset by three standard deviations
    window = judged(shifted)
    inputs = [name for name in window["top_features"] if name.startswith("input.")]
    assert window["drifting"] and inputs and all(name.startswith("input.series.0.") for name in inputs), window["top_features"]


def _stream(path: Path, *, recordings: int = 2, samples: int = 1200, seed: int = 0) -> Path:
    """A CSV of 3-channel samples in time order: each label a sine of its own frequency, in blocks of 100 samples."""
    rng = np.random.default_rng(seed)
    lines = ["machine,ax,ay,az,state"]
    for recording in range(recordings):
        for t in range(samples):
            state = ("idle", "drill", "cut")[(t // 100 + recording) % 3]
            frequency = {"idle": 0.02, "drill": 0.11, "cut": 0.31}[state]
            values = [np.sin(2 * np.pi * frequency * t + phase) + 0.1 * rng.normal() for phase in (0, 1, 2)]
            lines.append(f"m{recording}," + ",".join(f"{v:.5f}" for v in values) + f",{state}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_windows_are_cut_per_recording_with_one_label_each_and_no_overlap_across_splits(tmp_path):
    from edgekit.config import WindowSection
    from edgekit.tasks.timeseries_data import load_windowed

    data = load_windowed(_stream(tmp_path / "s.csv"), WindowSection(length=50, step=25, recording_column="machine"), "state")
    assert data.train.inputs.shape[1:] == (3, 50) and set(data.labels) == {"idle", "drill", "cut"}
    # Per recording of 1200: train 840 samples, val 120, test 240; a window straddling a label change is dropped.
    assert data.summary["dropped"]["windows_with_mixed_labels"] > 0 and data.summary["recordings"] == 2
    assert len(data.test) and len(data.val) and len(data.train) > len(data.test) > len(data.val)
    train_rows = {window.tobytes() for window in data.train.inputs}
    assert not any(window.tobytes() in train_rows for window in data.test.inputs)


@pytest.mark.parametrize(
    ("edit", "window", "message"),
    [
        (lambda text: text.replace("state", "mode", 1), {"length": 50, "step": 25}, r"no column 'state'; the columns are"),
        (lambda text: text.replace("\nm0,", "\nm0,1.0,", 1), {"length": 50, "step": 25}, r"s\.csv:2: 6 cells but the header has 5"),
        (lambda text: text.replace("\nm0,", "\nm0,x", 1), {"length": 50, "step": 25}, r"s\.csv:2: column 'ax' holds 'x"),
        (lambda text: text, {"length": 500, "step": 25}, r"no train window of 500 samples with one label; .* at least 500 samples of one label"),
    ],
)
def test_a_bad_recording_is_named_with_its_line_or_the_length_it_needs(tmp_path, edit, window, message):
    from edgekit.config import WindowSection
    from edgekit.tasks.timeseries_data import load_windowed

    path = _stream(tmp_path / "s.csv")
    path.write_text(edit(path.read_text()))
    with pytest.raises(DataError, match=message):
        load_windowed(path, WindowSection(**window, recording_column="machine"), "state")


@pytest.mark.slow
def test_a_continuous_recording_builds_a_window_classifier(tmp_path):
    from tests.support.builds import relaxed_target

    target = relaxed_target(tmp_path, "x86-64-cpu", max_accuracy_drop_points=5.0, min_top1_agreement=0.9)
    config = tmp_path / "stream.yaml"
    config.write_text(json.dumps({
        "model": {"source": "builtin:cnn1d", "name": "machine-state", "version": "1.0.0"},
        "task": {"kind": "timeseries-classification", "window": {"length": 50, "step": 25, "recording_column": "machine"}},
        "data": {"path": str(_stream(tmp_path / "stream.csv")), "label_column": "state", "calibration_path": None},
        "train": {"epochs": 15, "batch_size": 16, "learning_rate": 0.003, "early_stopping_patience": 5},
        "evaluation": {"latency_iterations": 5, "throughput_seconds": 0.2},
        "targets": [str(target)],
    }))
    result = CliRunner().invoke(app, ["build", str(config), "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "x86-64-cpu-test" / "report.json").read_text())
    assert report["passed"] and report["metrics"]["final"]["accuracy"] > 0.9, report["metrics"]["final"]
    assert report["data"]["series"] == {"channels": 3, "steps": 50}
