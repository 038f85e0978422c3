"""Adding a task is one module and one registry line: a toy task (tests/support/toy_task.py) builds a signed bundle.

The passes ask the task (``edgekit.tasks.Task``) and never branch on its kind,
so the whole pipeline (load → export → optimize → quantize → compile → evaluate
→ package) runs a task it has never seen, and a device opens the bundle and
reproduces its golden outputs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from edgekit.cli import app
from tests.support import toy_task
from tests.support.builds import relaxed_target


@pytest.fixture
def with_toy_task(monkeypatch):
    import edgekit.tasks

    # The one line a newcomer adds to the literal registry in edgekit/tasks/__init__.py.
    monkeypatch.setitem(edgekit.tasks.TASKS, toy_task.KIND, toy_task.TASK)


def _toy_data(path: Path) -> Path:
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 3, size=(3, 8))
    classes = rng.integers(0, 3, size=900)
    features = centres[classes] + rng.normal(0, 1, size=(900, 8))
    np.savez(path, features=features.astype(np.float32), labels=np.asarray(["red", "green", "blue"])[classes])
    return path


def test_the_registry_lists_what_the_config_accepts():
    from edgekit.config import BuildConfig
    from edgekit.errors import EdgekitError
    from edgekit.tasks import TASKS, task_for

    assert set(TASKS) == {"text-classification", "image-classification", "timeseries-classification", "tabular-classification",
                          "anomaly-detection"}
    with pytest.raises(ValueError, match="unknown task 'toy-vectors'; known: text-classification, image-classification, timeseries-classification"):
        BuildConfig(task={"kind": "toy-vectors"})
    with pytest.raises(EdgekitError, match="unknown task 'toy-vectors'"):
        task_for("toy-vectors")


@pytest.mark.slow
def test_a_new_task_builds_a_signed_bundle_a_device_opens(with_toy_task, tmp_path):
    from device_agent.bundle import open_bundle
    from device_agent.keys import Keyring
    from device_agent.runtime import open_model, run_golden_check

    model = tmp_path / "toy-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"hidden": 16}))
    target = relaxed_target(tmp_path, "x86-64-cpu", max_accuracy_drop_points=5.0, min_top1_agreement=0.9)
    config = tmp_path / "build.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"source": str(model), "name": "toy", "version": "1.0.0"},
        "task": {"kind": "toy-vectors"},
        "data": {"path": str(_toy_data(tmp_path / "toy.npz")), "calibration_path": None},
        "quantization": {"time_limit_s": 20, "evaluation_samples": 100},
        "evaluation": {"latency_iterations": 5, "throughput_seconds": 0.2},
        "targets": [str(target)],
    }))
    result = CliRunner().invoke(app, ["build", str(config), "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output

    report = json.loads((tmp_path / "out" / "x86-64-cpu-test" / "report.json").read_text())
    assert report["passed"], report["gates"]
    assert [p["name"] for p in report["passes"]] == ["load", "export", "optimize", "quantize", "compile", "evaluate", "package"]
    assert report["metrics"]["final"]["accuracy"] > 0.9, "three well-separated blobs are easy"
    keyring = tmp_path / "keyring"
    keyring.mkdir()
    shutil.copy(tmp_path / "cache" / "dev-key" / "edgekit.pub", keyring / "dev.pub")
    with open_bundle(Path(report["bundle"]), Keyring.load(keyring)) as opened:
        manifest = opened.manifest
        assert manifest.task.kind == "tensor" and manifest.preprocessing.kind == "none" and manifest.drift_reference is None
        assert [spec.name for spec in manifest.inputs] == ["features"]
        session = open_model(manifest, opened.path(manifest.runtime.model_file))
        assert run_golden_check(session, opened.path(manifest.golden.file)) <= manifest.golden.atol


def test_an_unknown_task_on_the_command_line_is_named_with_the_known_ones(tmp_path):
    result = CliRunner().invoke(app, ["build", "--task", "tabular-regression", "--dry-run", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "unknown task 'tabular-regression'; known: text-classification, image-classification, timeseries-classification" in result.output
