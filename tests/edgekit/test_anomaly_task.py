"""Anomaly detection on table rows: normal rows only in training, a threshold from held-out normal rows, and a bundle
whose agent answers each raw row with its score and its flag."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest

from edgekit.config import BuildConfig
from edgekit.data import DataError
from edgekit.tasks.anomaly_detection import load_task_data


def _config(path: Path, **data) -> BuildConfig:
    return BuildConfig.model_validate({"task": {"kind": "anomaly-detection"}, "model": {"source": "builtin:autoencoder"},
                                       "data": {"path": str(path), "label_column": "state", **data}})


def write_machine_table(path: Path, rows: int = 2000, seed: int = 1, labelled: bool = True) -> Path:
    """Sensor readings of machines: temperature and vibration follow the load; 3% bearing faults (vibration up) and
    3% overheating (temperature up) when ``labelled`` says which."""
    rng = random.Random(seed)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["temperature", "vibration", "load", "mode"] + (["state"] if labelled else []))
        for _ in range(rows):
            load, mode = rng.uniform(0.2, 1.0), rng.choice(["idle", "run", "boost"])
            temperature = 40 + 30 * load + (8 if mode == "boost" else 0) + rng.gauss(0, 2)
            vibration, state = 0.5 + 0.8 * load + rng.gauss(0, 0.1), "normal"
            draw = rng.random()
            if draw < 0.03:
                vibration, state = vibration + rng.uniform(0.8, 2.0), "bearing"
            elif draw < 0.06:
                temperature, state = temperature + rng.uniform(15, 30), "overheat"
            writer.writerow([round(temperature, 2), round(vibration, 3), round(load, 3), mode] + ([state] if labelled else []))
    return path


def test_the_model_learns_normal_rows_only_and_anomalies_wait_in_val_and_test(tmp_path):
    data = load_task_data(_config(write_machine_table(tmp_path / "m.csv")))
    assert data.labels == ("normal", "anomaly")
    assert set(np.unique(data.train.labels)) == {0}, "no anomaly is trained on"
    anomalies = data.summary["anomalies"]
    assert anomalies["labelled"] == anomalies["in_val"] + anomalies["in_test"] > 0
    assert int(np.sum(data.val.labels == 1)) == anomalies["in_val"] and int(np.sum(data.test.labels == 1)) == anomalies["in_test"]
    assert set(data.train.inputs[0]) == {"temperature", "vibration", "load", "mode"}


def test_without_a_label_column_every_row_is_normal(tmp_path):
    path = write_machine_table(tmp_path / "m.csv", labelled=False)
    data = load_task_data(BuildConfig.model_validate({"task": {"kind": "anomaly-detection"}, "model": {"source": "builtin:autoencoder"},
                                                      "data": {"path": str(path)}}))
    assert len(data.train) + len(data.val) + len(data.test) == 2000
    assert not np.any(data.test.labels) and data.summary["warnings"]


def test_too_few_normal_rows_and_a_separate_test_file_are_refused(tmp_path):
    path = tmp_path / "few.csv"
    path.write_text("x,state\n" + "".join(f"{i},normal\n" for i in range(5)) + "99,broken\n")
    with pytest.raises(DataError, match="has 5 normal rows .* needs at least 20"):
        load_task_data(_config(path))
    config = BuildConfig.model_validate({"task": {"kind": "anomaly-detection"}, "model": {"source": "builtin:autoencoder"},
                                         "data": {"path": str(path), "test_path": str(path)}})
    from edgekit.tasks import task_for

    with pytest.raises(Exception, match="holds out its own test split; remove data.test_path"):
        task_for("anomaly-detection").load_data(config)


def test_an_anomaly_config_is_checked_against_the_task():
    with pytest.raises(ValueError, match="is not an anomaly detector; anomaly-detection takes builtin:autoencoder"):
        BuildConfig.model_validate({"task": {"kind": "anomaly-detection"}})
    with pytest.raises(ValueError, match="finetune does not apply to anomaly-detection"):
        BuildConfig.model_validate({"task": {"kind": "anomaly-detection"}, "model": {"source": "builtin:autoencoder"},
                                    "finetune": {"enabled": True}})


@pytest.mark.slow
def test_a_machine_table_builds_a_detector_the_agent_runs_on_raw_rows(tmp_path):
    import shutil

    import httpx
    from typer.testing import CliRunner

    from edgekit.cli import app
    from tests.support.agent import AgentProcess

    write_machine_table(tmp_path / "m.csv")
    config = tmp_path / "machines.yaml"
    config.write_text(json.dumps({
        "model": {"source": "builtin:autoencoder", "name": "machines", "version": "1.0.0"},
        "task": {"kind": "anomaly-detection"},
        "data": {"path": str(tmp_path / "m.csv"), "label_column": "state", "calibration_path": None},
        "train": {"epochs": 40, "batch_size": 64, "learning_rate": 0.003, "early_stopping_patience": 8},
        "targets": ["x86-64-cpu"],
    }))
    result = CliRunner().invoke(app, ["build", str(config), "--out", str(tmp_path / "out"), "--cache-dir",
                                      str(tmp_path / "cache"), "--no-search"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "x86-64-cpu" / "report.json").read_text())
    per_class = report["metrics"]["per_class"]
    assert report["passed"] and per_class["anomaly"]["recall"] >= 0.9 and per_class["normal"]["recall"] >= 0.95, per_class
    assert report["metrics"]["pr_auc"]["final"] >= 0.9 and report["metrics"]["pr_auc"]["positive"] == "anomaly"

    keyring = tmp_path / "keyring"
    keyring.mkdir()
    shutil.copy(tmp_path / "cache" / "dev-key" / "edgekit.pub", keyring / "dev.pub")
    agent = AgentProcess(tmp_path, keyring).start()
    try:
        flashed = CliRunner().invoke(app, ["flash", report["bundle"], "--device", agent.url, "--token-file", str(tmp_path / "admin.token")])
        assert flashed.exit_code == 0, flashed.output
        rows = [{"temperature": 61.0, "vibration": 1.06, "load": 0.6, "mode": "run"},     # what the machines do
                {"temperature": 61.0, "vibration": 3.2, "load": 0.6, "mode": "run"}]      # a worn bearing
        request = {"inputs": [{"name": "rows", "shape": [2], "datatype": "BYTES", "data": [json.dumps(r) for r in rows]}],
                   "outputs": [{"name": "logits", "parameters": {"classification": 1}}, {"name": "score"}]}
        answer = httpx.post(f"{agent.url}/v2/models/machines/infer", json=request, timeout=30)
        assert answer.status_code == 200, answer.text
        outputs = {output["name"]: output["data"] for output in answer.json()["outputs"]}
        assert [item.split(":")[-1] for item in outputs["logits"]] == ["normal", "anomaly"]
        assert outputs["score"][1] > 10 * outputs["score"][0]
    finally:
        agent.stop()


def write_motor_windows(path: Path, count: int = 400, seed: int = 0) -> Path:
    """Two-channel motor current windows of 64 steps: a steady hum; 5% carry a fault (a burst of spikes)."""
    rng = np.random.default_rng(seed)
    time = np.arange(64) / 64
    windows, labels = [], []
    for _ in range(count):
        phase = rng.uniform(0, 2 * np.pi)
        window = np.stack([np.sin(2 * np.pi * 4 * time + phase), np.cos(2 * np.pi * 4 * time + phase)])
        window += rng.normal(0, 0.05, window.shape)
        fault = rng.random() < 0.05
        if fault:
            at = rng.integers(8, 56)
            window[:, at:at + 4] += rng.choice([-1, 1]) * 2.5
        windows.append(window.astype(np.float32))
        labels.append("fault" if fault else "normal")
    np.savez(path, X=np.stack(windows), y=np.asarray(labels))
    return path


def test_sensor_windows_are_read_as_series_and_split_by_label(tmp_path):
    data = load_task_data(_config(write_motor_windows(tmp_path / "w.npz")))
    assert data.train.inputs.shape[1:] == (2, 64) and not np.any(data.train.labels)
    assert data.summary["series"] == {"channels": 2, "steps": 64} and data.summary["anomalies"]["labelled"] > 0
    with pytest.raises(DataError, match="no series is labelled 'healthy'"):
        load_task_data(BuildConfig.model_validate({
            "task": {"kind": "anomaly-detection", "anomaly": {"normal_label": "healthy"}},
            "model": {"source": "builtin:autoencoder"}, "data": {"path": str(tmp_path / "w.npz")}}))


@pytest.mark.slow
def test_a_window_detector_flags_a_fault_burst_in_raw_windows(tmp_path):
    from typer.testing import CliRunner

    from edgekit.cli import app

    write_motor_windows(tmp_path / "w.npz", count=600)
    config = tmp_path / "motor.yaml"
    config.write_text(json.dumps({
        "model": {"source": "builtin:autoencoder", "name": "motor", "version": "1.0.0", "widths": [64, 16]},
        "task": {"kind": "anomaly-detection"},
        "data": {"path": str(tmp_path / "w.npz"), "calibration_path": None},
        "train": {"epochs": 60, "batch_size": 32, "learning_rate": 0.003, "early_stopping_patience": 10},
        "targets": ["x86-64-cpu"],
    }))
    result = CliRunner().invoke(app, ["build", str(config), "--out", str(tmp_path / "out"), "--no-search"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "x86-64-cpu" / "report.json").read_text())
    assert report["passed"] and report["metrics"]["per_class"]["anomaly"]["recall"] >= 0.8, report["metrics"]["per_class"]
    assert report["metrics"]["per_class"]["normal"]["recall"] >= 0.95


def test_rows_without_a_label_are_left_out_and_a_misnamed_label_column_is_refused(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("x,state\n" + "".join(f"{i},normal\n" for i in range(40)) + "99,broken\n5,\n6,\n")
    data = load_task_data(_config(path))
    assert data.summary["dropped"] == {"no label": 2} and data.summary["anomalies"]["labelled"] == 1
    assert any("held-out normal rows" in warning for warning in data.summary["warnings"]), "4 validation rows: warned"
    with pytest.raises(DataError, match="has no column 'status' \\(data.label_column\\)"):
        load_task_data(BuildConfig.model_validate({"task": {"kind": "anomaly-detection"}, "model": {"source": "builtin:autoencoder"},
                                                   "data": {"path": str(path), "label_column": "status"}}))


def test_an_anomaly_detector_is_not_searched():
    with pytest.raises(ValueError, match="anomaly-detection is not searched"):
        BuildConfig.model_validate({"task": {"kind": "anomaly-detection"}, "model": {"source": "builtin:autoencoder"},
                                    "search": {"enabled": True}})
    config = BuildConfig.model_validate({"task": {"kind": "anomaly-detection"}, "model": {"source": "auto"}})
    assert config.model.source == "builtin:autoencoder" and config.search.enabled == "auto"
