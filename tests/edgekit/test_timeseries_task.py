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
        ("1,2,3:4,x,6:up\n", HEADER, r"a\.ts:9: a value is not a number .*a missing value is written '\?'"),
        ("1,2,3:4,inf,6:up\n", HEADER, r"a\.ts:9: infinite values; a missing value is written '\?'"),
        ("1,2,3:?,?,?:up\n", HEADER, r"a\.ts:9: channel 1 \(counting from 0\) has no observed value \(all 3 missing\)"),
        ("1,2,3:4,5,6:up\n", HEADER.replace("@dimensions 2", "@dimensions 3"), r"@dimensions 3 but the samples have 2"),
        ("1,2,3:up\n", HEADER.replace("@classLabel true up down", "@classLabel false"), r"no '@classLabel true <labels>'"),
        ("1,2,3:4,5:up\n", HEADER.replace("@equalLength true", "@equalLength false"), r"a\.ts:9: 2 channel\(s\) of lengths \[2, 3\]: .* the channels of one sample one length"),
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


# ---------------------------------------------------------------- missing values, unequal lengths, CSV series


def test_missing_values_are_interpolated_over_time_and_counted(tmp_path):
    series, _, _ = read_series(_ts(tmp_path / "a.ts", "1,?,3:?,5,?:up\n?,?,9:1,?,nan:down\n"))
    assert series.tolist() == [[[1, 2, 3], [5, 5, 5]], [[9, 9, 9], [1, 1, 1]]]  # between: linear; beyond the ends: nearest
    x = np.tile(np.arange(6, dtype=np.float32), (30, 2, 1))
    x[::2, 1, 1:5] = np.nan  # 0 . . . . 5 → 0 1 2 3 4 5
    x[1::2, 0, :2] = np.nan  # . . 2 3 4 5 → 2 2 2 3 4 5
    np.savez(tmp_path / "s.npz", X=x, y=np.repeat(["a", "b"], 15))
    data = load_task_data(tmp_path / "s.npz", None)
    filled = np.concatenate([data.train.inputs, data.val.inputs, data.test.inputs])
    assert {tuple(row) for row in filled[:, 0].tolist()} == {(0, 1, 2, 3, 4, 5), (2, 2, 2, 3, 4, 5)}
    assert (filled[:, 1] == np.arange(6)).all() and data.summary["imputed_values"] == 15 * 4 + 15 * 2
    assert "lengths" not in data.summary, "equal lengths: nothing padded, nothing said"


def _ragged_ts(path: Path, lengths: list[int]) -> Path:
    """Univariate series of the given lengths, values step + 10 * sample, labels alternating up / down."""
    body = "".join(",".join(str(step + 10 * i) for step in range(n)) + (":up\n" if i % 2 else ":down\n")
                   for i, n in enumerate(lengths))
    return _ts(path, body, HEADER.replace("@dimensions 2", "@dimensions 1").replace("@equalLength true", "@equalLength false"))


def test_unequal_lengths_are_padded_with_the_last_value_or_cut_to_task_series_length(tmp_path):
    series, _, _ = read_series(_ts(tmp_path / "a.ts", "1,2,3:4,5,6:up\n7,8:1,2:down\n",
                                   HEADER.replace("@equalLength true", "@equalLength false")))
    assert series.shape == (2, 2, 3) and series[1].tolist() == [[7, 8, 8], [1, 2, 2]]
    path = _ragged_ts(tmp_path / "r.ts", [3 + i % 4 for i in range(40)])  # lengths 3..6
    data = load_task_data(path, None)
    assert data.train.inputs.shape[1:] == (1, 6)
    assert data.summary["lengths"] == {"steps": 6, "from": "the longest training series", "shortest": 3, "longest": 6,
                                       "padded": 30, "truncated": 0}
    short = load_task_data(path, None, series_length=4)
    assert short.train.inputs.shape[1:] == (1, 4) and short.summary["lengths"]["truncated"] == 20
    assert short.summary["lengths"]["padded"] == 10 and short.summary["lengths"]["from"] == "task.series_length"
    rows = short.train.inputs[:, 0]  # step + 10 * sample: the first 3 steps kept, the 4th the series' own or its last
    assert (rows[:, :3] == rows[:, :1] + [0, 1, 2]).all() and set((rows[:, 3] - rows[:, 0]).tolist()) == {2, 3}


def _wide_and_long(tmp_path: Path, x: np.ndarray, y: np.ndarray) -> tuple[Path, Path]:
    """The same series as a wide CSV (steps shuffled) and a long one (rows shuffled), channels ax and ay."""
    rng = np.random.default_rng(1)
    order = ["state", *(f"{c}_{t}" for c in ("ax", "ay") for t in rng.permutation(x.shape[2]))]  # channels: first seen first
    rows = [{"state": label, **{f"{c}_{t}": repr(float(x[i, k, t])) for k, c in enumerate(("ax", "ay"))
                                for t in range(x.shape[2])}} for i, label in enumerate(y)]
    (tmp_path / "w.csv").write_text("\n".join([",".join(order)] + [",".join(row[c] for c in order) for row in rows]) + "\n")
    long = [f"s{i},{t * 0.5},{float(x[i, 0, t])!r},{label},{float(x[i, 1, t])!r}"
            for i, label in enumerate(y) for t in rng.permutation(x.shape[2])]
    (tmp_path / "l.csv").write_text("id,time,ax,state,ay\n" + "\n".join(long) + "\n")
    return tmp_path / "w.csv", tmp_path / "l.csv"


def test_a_wide_and_a_long_csv_read_to_the_same_series_as_an_npz(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 2, 7)).astype(np.float32), np.repeat(["idle", "walk", "run"], 10)
    x[3, 1, 2] = np.nan
    np.savez(tmp_path / "s.npz", X=x, y=y)
    wide, long = _wide_and_long(tmp_path, x, y)
    text = wide.read_text().splitlines()
    wide.write_text("\n".join([text[0]] + [line.replace("nan", "") for line in text[1:]]) + "\n")  # missing: an empty cell
    loaded = {path.name: load_task_data(path, None, label_column="state") for path in (tmp_path / "s.npz", wide, long)}
    assert len({data.digest for data in loaded.values()}) == 1, "same rows, same splits, same order"
    assert all(data.summary["imputed_values"] == 1 for data in loaded.values())
    assert loaded["w.csv"].summary["channel_names"] == loaded["l.csv"].summary["channel_names"] == ["ax", "ay"]
    assert np.array_equal(read_series(wide, "state")[0], read_series(tmp_path / "s.npz")[0])
    (tmp_path / "u.csv").write_text("2,0,1,label\n3,1,2,a\n4,2,?,b\n")  # one channel: columns numbered by step
    assert read_series(tmp_path / "u.csv")[0].tolist() == [[[1, 2, 3]], [[2, 3, 4]]]


LONG = "id,time,x,label\na,0,1,up\na,1,2,up\na,2,3,up\nb,0,4,down\nb,1,5,down\n"


@pytest.mark.parametrize(
    ("text", "options", "message"),
    [
        ("x_0,x_1,state\n1,2,a\n", {}, r"w\.csv: no label column 'label'; the columns are \['x_0', 'x_1', 'state'\] \(set data\.label_column\)"),
        ("x_0,x_1,id,label\n1,2,7,a\n", {}, r"column\(s\) \['id'\] are neither the label .* <channel>_<step>"),
        ("x_0,x_2,label\n1,2,a\n", {}, r"channel 'x' lacks column\(s\) \['x_1'\]"),
        ("x_0,x_1,y_0,y_1,label\n1,2,3,4,a\n1,2,,?,b\n", {}, r"w\.csv:3: channel 'y' has no observed value \(all 2 missing\)"),
        (LONG, {}, r"w\.csv id 'b' has 2 time steps but id 'a' has 3; .* unless task\.series_length is set"),
        (LONG.replace("time", "t"), {"series_format": "long"}, r"a long CSV needs columns id, time and 'label' .* lacks \['time'\]"),
        (LONG.replace("b,1,5", "b,0,5"), {"series_length": 3}, r"w\.csv:6: id 'b' has time '0' twice \(also on line 5\)"),
        (LONG.replace("b,1,5,down", "b,1,5,up"), {}, r"id 'b' has labels \['down', 'up'\]; the rows of one id"),
        (LONG.replace("a,1,2", "a,1,inf"), {}, r"w\.csv:3: column 'x' holds 'inf', an infinite value"),
    ],
)
def test_a_bad_csv_of_series_is_named_with_its_column_id_or_line(tmp_path, text, options, message):
    (tmp_path / "w.csv").write_text(text)
    with pytest.raises(DataError, match=message):
        read_series(tmp_path / "w.csv", "label", options.get("series_format"), options.get("series_length"))


def test_a_long_csv_of_ragged_lengths_is_padded_once_task_series_length_is_set(tmp_path):
    (tmp_path / "l.csv").write_text(LONG)
    series, labels, _ = read_series(tmp_path / "l.csv", length=3)
    assert series.tolist() == [[[1, 2, 3]], [[4, 5, 5]]] and labels == ["up", "down"]


def test_task_series_knobs_are_validated_against_windows():
    with pytest.raises(ValueError, match=r"task\.series_length: for series read whole, but task\.window cuts windows"):
        BuildConfig.model_validate({"model": {"source": "builtin:cnn1d"}, "task": {
            "kind": "timeseries-classification", "series_length": 50, "window": {"length": 50, "step": 25}}})
    with pytest.raises(ValueError, match=r"series_format"):
        BuildConfig.model_validate({"model": {"source": "builtin:cnn1d"}, "task": {"kind": "timeseries-classification",
                                                                                   "series_format": "tall"}})
    config = BuildConfig.model_validate({"model": {"source": "builtin:cnn1d"}, "task": {
        "kind": "timeseries-classification", "series_length": 50, "series_format": "long"}})
    assert config.task.series_length == 50


# ---------------------------------------------------------------- builtin:minirocket


def _waves(count: int, seed: int, channels: int = 3, steps: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Sines and square waves of random period and phase, plus noise: [count, channels, steps] and labels 0/1."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 2
    t = np.arange(steps)
    period = rng.uniform(10, 30, size=(count, 1, 1))
    phase = rng.uniform(0, 2 * np.pi, size=(count, channels, 1))
    sine = np.sin(2 * np.pi * t / period + phase)
    waves = np.where(labels[:, None, None] == 1, np.sign(sine), sine)
    return (waves + 0.3 * rng.normal(size=waves.shape)).astype(np.float32), labels


def _minirocket(x: np.ndarray, classes: int = 2, features: int = 10_000):
    from edgekit.tasks.series_models import MINIROCKET, SeriesModelRecord, new_model
    from edgekit.tasks.timeseries_data import channel_statistics

    mean, std = channel_statistics(x)
    record = SeriesModelRecord(MINIROCKET, x.shape[1], x.shape[2], classes, [features], mean, std)
    return new_model(record, x, seed=0), record


def test_minirocket_has_the_papers_84_kernels_and_exponential_dilations():
    from edgekit.tasks.series_models import minirocket_dilations, minirocket_kernels

    kernels = minirocket_kernels()
    assert kernels.shape == (84, 9) and set(np.unique(kernels)) == {-1.0, 2.0}
    assert (kernels == 2).sum(axis=1).tolist() == [3] * 84 and len({row.tobytes() for row in kernels}) == 84
    assert (kernels.sum(axis=1) == 0).all()
    layout = minirocket_dilations(100, 10_000)  # BasicMotions: 119 features per kernel over dilations 1..12
    dilations = [d for d, _ in layout]
    assert dilations[0] == 1 and max(dilations) == 12 and (max(dilations) * 8 <= 99) and dilations == sorted(set(dilations))
    assert sum(b for _, b in layout) == 119
    assert minirocket_dilations(24, 10_000)[-1][0] == 2 and sum(b for _, b in minirocket_dilations(5000, 10_000)) == 119
    assert len(minirocket_dilations(5000, 10_000)) <= 32


def test_minirocket_features_are_the_ppv_of_the_kernels_against_their_biases_exactly():
    """Each feature, recomputed by hand in float64 from the model's own weights and biases, is the model's, bit for bit."""
    import torch

    x, _ = _waves(12, seed=1)
    model, _ = _minirocket(x, features=840)
    series = torch.from_numpy(x)
    with torch.no_grad():
        features = model.features(series).numpy()
        normalised = model.normalise(series).double().numpy()
    assert features.shape == (12, 840) and 0.2 < features.mean() < 0.8
    column = 0
    for dilation in model.dilations:
        for part, padding in (("padded", 4 * dilation.dilation), ("valid", 0)):
            weights = getattr(dilation, f"{part}_weight").double().numpy()
            biases = getattr(dilation, f"{part}_bias").double().numpy()[:, :, 0]
            padded = np.pad(normalised, ((0, 0), (0, 0), (padding, padding)))
            steps = padded.shape[-1] - 8 * dilation.dilation
            taps = np.stack([padded[:, :, k * dilation.dilation:k * dilation.dilation + steps] for k in range(9)], axis=-1)
            convolved = np.einsum("ncsk,mck->nms", taps, weights)  # [series, kernels, steps]
            expected = (convolved[:, :, None, :] > biases[None, :, :, None]).mean(-1).reshape(len(x), -1)
            assert np.array_equal(features[:, column:column + expected.shape[1]], expected.astype(np.float32)), (dilation.dilation, part)
            column += expected.shape[1]
    assert column == 840


def test_minirocket_trains_on_waves_and_its_onnx_export_matches_torch(tmp_path):
    import onnx
    import onnxruntime
    import torch

    from edgekit import training
    from edgekit.tasks.series_models import save_model, trainable_part
    from edgekit.tasks.timeseries_classification import TASK
    from tests.support.train import fit_on

    train_x, train_y = _waves(60, seed=2)
    test_x, test_y = _waves(40, seed=3)
    model, record = _minirocket(train_x)
    head, features, _ = trainable_part(model, record, train_x, test_x[:4])
    assert head is model.classifier and features.shape == (60, 84 * 119)
    batches = [training.Batch({"x": torch.from_numpy(features[i:i + 10])}, torch.from_numpy(train_y[i:i + 10])) for i in range(0, 60, 10)]
    fit_on(head, batches, learning_rate=1e-3, epochs=20)
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(test_x)).numpy()
    assert (logits.argmax(-1) == test_y).mean() >= 0.95
    save_model(model, record, tmp_path / "torch")
    TASK.export_onnx(tmp_path / "torch", tmp_path / "model.onnx", 17, lambda _: None)
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert np.abs(session.run(None, {"series": test_x})[0] - logits).max() < 1e-4
    assert {"Conv", "Greater", "ReduceMean", "Gemm"} <= {node.op_type for node in onnx.load(str(tmp_path / "model.onnx")).graph.node}


@pytest.mark.parametrize(
    ("widths", "message"),
    [([32, 64], r"model\.widths for builtin:minirocket is \[number of features\] \(at least 84, default \[10000\]\); got \[32, 64\]"),
     ([50], r"got \[50\]")],
)
def test_minirocket_widths_are_its_number_of_features(widths, message):
    with pytest.raises(ValueError, match=message):
        BuildConfig.model_validate({"model": {"source": "builtin:minirocket", "widths": widths}, "task": {"kind": "timeseries-classification"}})
    assert BuildConfig.model_validate({"model": {"source": "builtin:minirocket", "widths": [2000]},
                                       "task": {"kind": "timeseries-classification"}}).model.widths == [2000]


def test_model_source_auto_searches_every_series_model():
    config = BuildConfig.model_validate({"model": {"source": "auto"}, "task": {"kind": "timeseries-classification"}})
    assert config.model.source == "builtin:cnn1d" and config.search.models == ["builtin:minirocket", "builtin:spectral-mlp"]


def test_a_minirocket_build_of_waves_gives_a_bundle_that_passes_its_gates(tmp_path):
    train_x, train_y = _waves(120, seed=4)
    np.savez(tmp_path / "waves.npz", X=train_x, y=np.where(train_y == 1, "square", "sine"))
    config = tmp_path / "waves.yaml"
    config.write_text(json.dumps({
        "model": {"source": "builtin:minirocket", "name": "waves", "version": "1.0.0"},
        "task": {"kind": "timeseries-classification"},
        "data": {"path": str(tmp_path / "waves.npz"), "calibration_path": None},
        "train": {"epochs": 30, "batch_size": 8, "learning_rate": 0.0001, "weight_decay": 0.0, "early_stopping_patience": 30},
        "evaluation": {"latency_iterations": 5, "throughput_seconds": 0.2},
        "targets": ["x86-64-cpu"],
    }))
    result = CliRunner().invoke(app, ["build", str(config), "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "x86-64-cpu" / "report.json").read_text())
    assert report["passed"] and report["bundle"] and report["metrics"]["final"]["accuracy"] >= 0.95, report["metrics"]["final"]
    assert report["metrics"]["load"]["model"] == "builtin:minirocket" and report["metrics"]["load"]["parameters"] == 2 * 9996 + 2
    assert report["quantization"]["scheme"] == "static_qdq" and report["precision"] in ("int8", "fp32")


# --------------------------------------------------------------------------- the spectral-feature model


def _tone_windows(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two-channel windows of 64 steps: a low hum (class 0) or a high whine (class 1) in noise: told apart by frequency."""
    rng = np.random.default_rng(seed)
    time = np.arange(64) / 64
    labels = rng.integers(0, 2, count)
    cycles = np.where(labels == 0, 3, 12)[:, None]
    phase = rng.uniform(0, 2 * np.pi, (count, 1))
    tone = np.sin(2 * np.pi * cycles * time + phase)
    windows = np.stack([tone, 0.5 * tone], axis=1) + rng.normal(0, 0.3, (count, 2, 64))
    return windows.astype(np.float32), labels


def test_a_spectral_model_builds_a_bundle_whose_device_computes_the_features(tmp_path):
    from device_agent.bundle import SpectralPreprocessing, open_bundle
    from device_agent.keys import Keyring

    windows, labels = _tone_windows(300)
    np.savez(tmp_path / "tones.npz", X=windows, y=np.where(labels == 0, "hum", "whine"))
    config = tmp_path / "tones.yaml"
    config.write_text(json.dumps({
        "model": {"source": "builtin:spectral-mlp", "name": "tones", "version": "1.0.0"},
        "task": {"kind": "timeseries-classification"},
        "data": {"path": str(tmp_path / "tones.npz"), "calibration_path": None},
        "train": {"epochs": 30, "batch_size": 32, "learning_rate": 0.003, "early_stopping_patience": 8},
        "targets": ["x86-64-cpu"],
    }))
    result = CliRunner().invoke(app, ["build", str(config), "--out", str(tmp_path / "out"), "--cache-dir",
                                      str(tmp_path / "cache"), "--no-search"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "x86-64-cpu" / "report.json").read_text())
    assert report["passed"] and report["metrics"]["final"]["accuracy"] >= 0.95, report["metrics"]["final"]
    keyring = tmp_path / "keyring"
    keyring.mkdir()
    shutil.copy(tmp_path / "cache" / "dev-key" / "edgekit.pub", keyring / "dev.pub")
    with open_bundle(Path(report["bundle"]), Keyring.load(keyring)) as opened:
        manifest = opened.manifest
        assert manifest.preprocessing == SpectralPreprocessing(channels=2, steps=64, bands=16)
        assert [(i.name, i.shape) for i in manifest.inputs] == [("features", ["batch", 2 * 21])]
        assert {"input.series.0.mean", "input.series.1.std"} <= set(manifest.drift_reference["features"])
