"""edgekit build end to end on a tiny BERT: shared prefix once, per-target bundles, cache, gates, and a device that serves it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from typer.testing import CliRunner

from device_agent.bundle import open_bundle, read_manifest_unverified
from device_agent.keys import Keyring
from edgekit.cli import app
from tests.support.builds import relaxed_target, tiny_text_build_config

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def _build(config: Path, out: Path, cache: Path, *extra: str):
    return runner.invoke(app, ["build", str(config), "--out", str(out), "--cache-dir", str(cache), *extra])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from tests.support.tiny_bert import tiny_hf_folder

    root = tmp_path_factory.mktemp("pipeline")
    model = tiny_hf_folder(root / "tiny-model")
    loose = {"max_accuracy_drop_points": 100.0, "min_top1_agreement": 0.0}
    targets = [relaxed_target(root, name, **loose) for name in ("x86-64-cpu", "jetson-orin-nano-8gb", "x86-64-cpu-openvino")]
    config = tiny_text_build_config(root, model, targets)
    result = _build(config, root / "out", root / "cache")
    assert result.exit_code == 0, result.output
    return root, config


@pytest.mark.slow
def test_build_writes_a_bundle_and_a_report_per_target(built):
    root, _ = built
    for target in ("x86-64-cpu-test", "jetson-orin-nano-8gb-test", "x86-64-cpu-openvino-test"):
        report = json.loads((root / "out" / target / "report.json").read_text())
        assert report["target"] == target and report["passed"]
        assert Path(report["bundle"]) == root / "out" / target / "tiny-1.0.0.ekb"
        assert all({"name", "value", "budget", "passed"} <= set(gate) for gate in report["gates"])
        assert [p["name"] for p in report["passes"]] == ["load", "export", "optimize", "quantize", "compile", "evaluate", "package"]
        for side in ("reference", "final"):
            for key in ("accuracy", "f1_macro", "latency_p50_ms", "throughput", "size_mb"):
                assert isinstance(report["metrics"][side][key], float), (side, key)
        assert 0 <= report["metrics"]["final"]["top1_agreement"] <= 1
        assert isinstance(report["kept_in_float"], list)
        assert (root / "out" / target / "passes" / "04-quantize" / "model.onnx").is_file(), "intermediates stay visible"
        labels = list(report["metrics"]["per_class"])
        assert len(report["metrics"]["confusion"]) == len(labels) and sum(map(sum, report["metrics"]["confusion"])) > 0
        assert report["data"]["rows_kept"] > 0 and set(report["data"]["balance"]) == {"train", "val", "test"}
        page = (root / "out" / target / "report.html").read_text()
        assert "<table class=confusion>" in page and all(label in page for label in labels)


@pytest.mark.slow
def test_shared_prefix_runs_once(built):
    root, _ = built
    reports = [json.loads((root / "out" / t / "report.json").read_text()) for t in ("x86-64-cpu-test", "jetson-orin-nano-8gb-test", "x86-64-cpu-openvino-test")]
    prefix_keys = [[(p["name"], p["key"]) for p in r["passes"][:2]] for r in reports]
    assert prefix_keys[0] == prefix_keys[1] == prefix_keys[2]
    assert len(list((root / "cache" / "load").iterdir())) == 1 and len(list((root / "cache" / "export").iterdir())) == 1
    assert len(list((root / "cache" / "optimize").iterdir())) == 3  # one per target


@pytest.mark.slow
def test_bundles_verify_and_jetson_carries_symmetric_qdq_and_engine_options(built):
    root, _ = built
    keyring = root / "keyring"
    keyring.mkdir(exist_ok=True)
    shutil.copy(root / "cache" / "dev-key" / "edgekit.pub", keyring / "dev.pub")
    result = runner.invoke(app, ["bundle", "verify", str(root / "out" / "x86-64-cpu-test" / "tiny-1.0.0.ekb"), "--keyring", str(keyring)])
    assert result.exit_code == 0, result.output

    with open_bundle(root / "out" / "jetson-orin-nano-8gb-test" / "tiny-1.0.0.ekb", Keyring.load(keyring)) as bundle:
        manifest = bundle.manifest
        assert manifest.runtime.engine == "tensorrt" and manifest.precision == "int8"
        assert manifest.runtime.engine_build["precision"] == "int8"
        assert manifest.runtime.engine_build["profile"]["input_ids"]["max"] == [8, 256]
        assert manifest.runtime.max_rows_per_run is None  # static int8 answers do not depend on the batch
        ranges = {spec.name: spec.value_range for spec in manifest.inputs}
        assert ranges["input_ids"] == (0, 30521) and ranges["token_type_ids"] == (0, 1)  # the agent refuses the rest
        graph = onnx.load(str(bundle.path("model.onnx"))).graph
        zero_points = {init.name: init for init in graph.initializer if "zero_point" in init.name}
        quantize_nodes = [n for n in graph.node if n.op_type == "QuantizeLinear"]
        assert quantize_nodes, "the Jetson bundle carries an explicitly quantized (QDQ) model"
        for node in quantize_nodes:
            zero_point = onnx.numpy_helper.to_array(zero_points[node.input[2]])
            assert zero_point.dtype == np.int8 and not zero_point.any(), "symmetric int8"


@pytest.mark.slow
def test_rebuild_is_fully_cached_and_dry_run_says_so(built):
    root, config = built
    result = _build(config, root / "out", root / "cache", "--dry-run", "--json")
    plan = json.loads(result.stdout)
    assert all(step["cached"] for steps in plan.values() for step in steps)
    result = _build(config, root / "out", root / "cache", "--json")
    assert result.exit_code == 0
    for report in json.loads(result.stdout):
        assert all(p["cached"] for p in report["passes"])


@pytest.mark.slow
def test_a_broken_budget_fails_the_build_without_a_bundle(built):
    root, config = built
    strict = relaxed_target(root, "x86-64-cpu", max_model_size_mb=0.001)  # no model is that small
    strict_name = "x86-64-cpu-strict"
    document = yaml.safe_load(strict.read_text())
    document["name"] = strict_name
    strict.write_text(yaml.safe_dump(document))
    document = yaml.safe_load(config.read_text())
    document["targets"] = [str(strict)]
    document["quantization"]["time_limit_s"] = 1
    strict_config = root / "strict.yaml"
    strict_config.write_text(yaml.safe_dump(document))
    result = _build(strict_config, root / "out-strict", root / "cache")
    assert result.exit_code == 1
    report = json.loads((root / "out-strict" / strict_name / "report.json").read_text())
    assert not report["passed"] and report["bundle"] is None
    assert any(not gate["passed"] for gate in report["gates"])
    assert report["quantization"]["trials"], "the trade-offs tried are reported"
    assert not list((root / "out-strict" / strict_name).glob("*.ekb"))
    assert (root / "out-strict" / strict_name / "passes" / "04-quantize" / "model.onnx").is_file(), "the best model is kept"

    # Rerun: every pass up to evaluate comes from the cache, but a failed verdict is measured again, not replayed.
    again = _build(strict_config, root / "out-strict", root / "cache", "--json")
    assert again.exit_code == 1
    (rerun,) = json.loads(again.stdout)
    cached = {p["name"]: p["cached"] for p in rerun["passes"]}
    assert cached == {"load": True, "export": True, "optimize": True, "quantize": True, "compile": True, "evaluate": False}


@pytest.mark.slow
def test_the_openvino_bundle_runs_on_openvino_and_on_onnx_runtime_where_openvino_is_missing(built, monkeypatch):
    import sys

    from device_agent.openvino_engine import OpenVINOSession
    from device_agent.runtime import ModelSession, open_model, run_golden_check

    root, _ = built
    report = json.loads((root / "out" / "x86-64-cpu-openvino-test" / "report.json").read_text())
    assert report["metrics"]["evaluation"]["runtime"].startswith("openvino CPU") and report["quantization"]["quantizer"] == "nncf"
    with open_bundle(root / "out" / "x86-64-cpu-openvino-test" / "tiny-1.0.0.ekb", Keyring.load(root / "cache" / "dev-key")) as bundle:
        manifest, model = bundle.manifest, bundle.path("model.onnx")
        assert (manifest.runtime.engine, manifest.precision, manifest.runtime.max_rows_per_run) == ("openvino", "int8", None)
        assert [n for n in onnx.load(str(model)).graph.node if n.op_type == "QuantizeLinear"], "NNCF's QDQ model"
        session = open_model(manifest, model)
        assert isinstance(session, OpenVINOSession) and session.providers == ["openvino CPU (f32 float layers)"]
        assert run_golden_check(session, bundle.path(manifest.golden.file)) == 0.0  # the golden outputs are OpenVINO's
        monkeypatch.setitem(sys.modules, "openvino", None)  # a device without OpenVINO
        fallback = open_model(manifest, model)
        assert isinstance(fallback, ModelSession) and fallback.providers == ["CPUExecutionProvider"]
        assert run_golden_check(fallback, bundle.path(manifest.golden.file)) <= manifest.golden.atol


@pytest.mark.slow
@pytest.mark.parametrize("target", ["x86-64-cpu-test", "x86-64-cpu-openvino-test"])
def test_the_device_serves_the_text_bundle_with_bytes_input(built, tmp_path, target):
    import tritonclient.http as triton

    from device_agent.preprocess import TextTokenizer
    from tests.support.agent import AgentProcess

    root, _ = built
    keyring = tmp_path / "keyring"
    keyring.mkdir()
    shutil.copy(root / "cache" / "dev-key" / "edgekit.pub", keyring / "dev.pub")
    agent = AgentProcess(tmp_path, keyring).start()
    try:
        bundle = root / "out" / target / "tiny-1.0.0.ekb"
        token = tmp_path / "admin.token"
        result = runner.invoke(app, ["flash", str(bundle), "--device", agent.url, "--token-file", str(token)])
        assert result.exit_code == 0, result.output  # installed only after its golden vectors passed here
        texts = ["a small domesticated carnivorous mammal", "a building where people live", "an edible fruit"]
        client = triton.InferenceServerClient(agent.url.removeprefix("http://"))
        text = triton.InferInput("text", [len(texts)], "BYTES")
        text.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object))
        logits = client.infer("tiny", [text], outputs=[triton.InferRequestedOutput("logits")]).as_numpy("logits")

        manifest, _ = read_manifest_unverified(bundle)
        if manifest.precision == "int8":  # dynamic int8 (ONNX Runtime): gated a row per run, never joined; static (OpenVINO): any
            assert manifest.runtime.max_rows_per_run == (None if manifest.runtime.engine == "openvino" else 1)
        from edgekit.engines import open_runner

        with open_bundle(bundle, Keyring.load(keyring)) as opened:
            session = open_runner(opened.path("model.onnx"), manifest.runtime.engine)  # the agent's runtime: the bundle's engine
            tokenizer = TextTokenizer(opened.path("tokenizer.json"), manifest.preprocessing.max_length)

            def run(some: list[str]) -> np.ndarray:
                return session.run(tokenizer.encode(some))[0]

            # Dynamic int8: each text gets the answer it gets alone (the gates measured that), not the padded batch's.
            expected = np.concatenate([run([text]) for text in texts]) if manifest.runtime.max_rows_per_run == 1 else run(texts)
            if manifest.runtime.max_rows_per_run == 1:  # ... and the padded batch's answer would be told apart (0.014 here)
                assert np.abs(run(texts) - expected).max() > 1e-3
        np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)
    finally:
        agent.stop()


def test_an_interrupted_pass_leaves_no_cache_entry(tmp_path):
    from rich.progress import Progress

    from device_agent.keys import generate_keypair
    from edgekit.artifact import Artifact, Pass, Stage, TaskSpec
    from edgekit.config import BuildConfig
    from edgekit.pipeline import Build, PlannedPass
    from edgekit.tasks.text_classification import load_task_data

    class Interrupted(Exception):
        pass

    def crash_midway(artifact, options, ctx):
        (ctx.work_dir / "half-written.onnx").write_bytes(b"partial")
        raise Interrupted

    config = BuildConfig()
    crashing = Pass("crashing", frozenset({Stage.SOURCE}), Stage.TORCH, lambda c, t: config.head, crash_midway, uses_data=False)
    key_path, _ = generate_keypair(tmp_path / "keys")
    build = Build(config, load_task_data(config.data), tmp_path / "out", tmp_path / "cache", key_path, Progress(disable=True), print)
    source = Artifact(Stage.SOURCE, tmp_path, "", "digest", TaskSpec("text-classification", ("a", "b"), 8, tmp_path))
    with pytest.raises(Interrupted):
        build._execute(PlannedPass(1, crashing, config.head, "k" * 32, None), source, tmp_path / "out")
    assert list((tmp_path / "cache" / "crashing").iterdir()) == [], "neither a half entry nor a temporary folder remains"
