"""Quantization-aware training in the build: when it runs, what it is judged against, and that a phase that hurts is discarded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from edgekit.cli import app
from edgekit.config import BuildConfig
from edgekit.pipeline import per_target
from edgekit.targets import load_target
from tests.support.builds import relaxed_target, tiny_text_build_config

runner = CliRunner()


def _qat_build(root: Path, model: Path, **qat) -> dict:
    target = relaxed_target(root, "x86-64-cpu", max_accuracy_drop_points=100.0, min_top1_agreement=0.0)
    config = tiny_text_build_config(root, model, [target])
    document = yaml.safe_load(config.read_text())
    document["qat"] = {"enabled": True, "max_train_rows": 320, **qat}
    config.write_text(yaml.safe_dump(document))
    result = runner.invoke(app, ["build", str(config), "--out", str(root / "out"), "--cache-dir", str(root / "cache")])
    assert result.exit_code == 0, result.output
    return json.loads((root / "out" / "x86-64-cpu-test" / "report.json").read_text())


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from tests.support.tiny_bert import tiny_hf_folder

    return tiny_hf_folder(tmp_path_factory.mktemp("qat") / "tiny-model")


def test_qat_runs_when_asked_for_dynamic_int8_targets_of_models_trained_here() -> None:
    dynamic, static = load_target("x86-64-cpu"), load_target("jetson-orin-nano-8gb")
    asked = BuildConfig.model_validate({"qat": {"enabled": True}})
    assert [p.name for p in per_target(asked, dynamic)][0] == "qat"
    assert [p.name for p in per_target(asked, static)][0] == "optimize"  # static QDQ is not emulated yet
    assert [p.name for p in per_target(BuildConfig(), dynamic)][0] == "optimize"  # off by default
    onnx_source = BuildConfig.model_validate({"model": {"source": "model.onnx"}, "qat": {"enabled": True}})
    assert [p.name for p in per_target(onnx_source, dynamic)][0] == "optimize"  # nothing to train: the quantize search alone


@pytest.mark.slow
def test_a_qat_model_is_judged_against_the_float_model_it_was_trained_from(tiny_model, tmp_path) -> None:
    report = _qat_build(tmp_path, tiny_model)
    assert [p["name"] for p in report["passes"]][:3] == ["load", "export", "qat"]
    qat = report["metrics"]["qat"]
    assert qat["scheme"] == "dynamic" and qat["train_rows"] == 320 and qat["parity_max_abs_error"] < 1e-3
    assert qat["val_agreement_after"] >= qat["val_agreement_before"]  # the starting weights compete
    assert 0 <= qat["val_float_agreement_after"] <= 1
    # Every judgement after QAT compares with the export pass's float model, not with the QAT model.
    artifact = json.loads((tmp_path / "out" / "x86-64-cpu-test" / "passes" / "07-evaluate" / "artifact.json").read_text())
    export_dir = (tmp_path / "out" / "passes" / "02-export").resolve()
    assert Path(artifact["float_model"]).resolve() == export_dir / "model.onnx"
    final = report["metrics"]["final"]
    assert final["flips"] == round((1 - final["top1_agreement"]) * report["metrics"]["evaluation"]["test_rows"])
    assert final["top1_agreement_lower_95"] <= final["top1_agreement"]
    # Dynamic int8 is scored a row per run (its ranges span a run); the batched agreement is shown beside it.
    assert report["metrics"]["evaluation"]["rows_per_run"] == 1
    assert 0 <= final["batched_top1_agreement"] <= 1
    assert any(gate["name"].startswith("top-1 agreement in padded batches") for gate in report["gates"])


@pytest.mark.slow
def test_a_qat_phase_that_hurts_agreement_is_discarded(tiny_model, tmp_path) -> None:
    import onnxruntime as ort

    from edgekit.pipeline import read_artifact
    from edgekit.tasks import load_task_data, model_feeds

    report = _qat_build(tmp_path, tiny_model, learning_rate=0.5, epochs=1)  # a step this large wrecks the model
    qat = report["metrics"]["qat"]
    assert qat["best_epoch"] == 0 and qat["kept"].startswith("the starting weights")
    assert qat["val_agreement_after"] == qat["val_agreement_before"]
    # ... and the exported model is the float model again.
    passes = tmp_path / "out" / "x86-64-cpu-test" / "passes"
    data = load_task_data(BuildConfig())
    artifact = json.loads((passes / "03-qat" / "artifact.json").read_text())
    sessions = [ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                for path in (passes / "03-qat" / "model.onnx", Path(artifact["float_model"]))]
    spec = read_artifact(passes / "03-qat").task
    feeds = model_feeds(spec, data.val.texts[:16])
    outputs = [session.run(None, feeds)[0] for session in sessions]
    np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-4)
