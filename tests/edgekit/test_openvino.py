"""The OpenVINO target: NNCF's int8 recipe judged with OpenVINO, nodes returned to float exactly, and the profile's rules."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml

from edgekit.config import BuildConfig
from edgekit.engines import open_runner
from edgekit.passes import quantize
from edgekit.targets import TargetProfile, load_target
from tests.support.tiny_bert import TinyBert, artifact_for, build_tiny_bert, context_for, export_text_cnn

ROOT = Path(__file__).resolve().parents[2]
TARGET = "x86-64-cpu-openvino"


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> TinyBert:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def _options(**changes) -> quantize.Options:
    options = quantize.options_for(BuildConfig(), load_target(TARGET))
    search = {k: v for k, v in changes.items() if k in options.search.model_fields}
    rest = {k: v for k, v in changes.items() if k not in search}
    return options.model_copy(update={"search": options.search.model_copy(update=search), **rest})


def _validation_logits(model: Path, tiny_bert: TinyBert, engine: str) -> np.ndarray:
    names = quantize._input_names(onnx.load(model).graph)
    batches = quantize.tokenized_batches(tiny_bert.task, tiny_bert.data.val.inputs[:100], names)
    runner = open_runner(model, engine)
    return np.concatenate([runner.run(batch)[0] for batch in batches])


def test_openvino_targets_quantize_with_nncf_and_judge_with_openvino(tiny_bert: TinyBert, tmp_path: Path, monkeypatch) -> None:
    from edgekit import engines

    engines_asked = []

    def recording(model, engine, threads=None):
        engines_asked.append(engine)
        return open_runner(model, engine, threads)

    monkeypatch.setattr(engines, "open_runner", recording)
    options = _options(min_top1_agreement=0.9, max_accuracy_drop_points=10.0, evaluation_samples=100)
    result = quantize.run(artifact_for(tiny_bert), options, context_for(tiny_bert, tmp_path))
    assert engines_asked and set(engines_asked) == {"openvino"}  # every candidate and the float parent, on OpenVINO
    report = result.results.quantization.model_dump()
    assert (report["quantizer"], report["scheme"], result.precision) == ("nncf", "static_qdq", "int8")
    assert report["calibration_rows"] == 200 and report["quantized_nodes"] > 0
    graph = onnx.load(result.model_path).graph
    ops = Counter(node.op_type for node in graph.node)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0
    assert [node for node in graph.node if node.name.endswith("nncf_smooth_quant")]  # the transformer preset's SmoothQuant
    # The judge ran OpenVINO: its agreement is what OpenVINO gives on the same rows, against OpenVINO's float model.
    reference = _validation_logits(tiny_bert.model_path, tiny_bert, "openvino").argmax(-1)
    quantized = _validation_logits(result.model_path, tiny_bert, "openvino").argmax(-1)
    assert report["top1_agreement"] == pytest.approx(float((reference == quantized).mean()))
    assert not (tmp_path / quantize.SCRATCH_DIR).exists()


def _nncf_model(tiny_bert: TinyBert, tmp_path: Path) -> tuple[onnx.ModelProto, onnx.ModelProto, list[str]]:
    options = _options()
    float_model = onnx.load(tiny_bert.model_path)
    recipe = quantize._recipe_for(options, float_model)
    nncf = quantize._nncf_quantize(recipe, artifact_for(tiny_bert), quantize._input_names(float_model.graph), (),
                                   context_for(tiny_bert, tmp_path))
    quantized = onnx.load(nncf.path)
    return float_model, quantized, quantize._quantized_nodes(float_model, quantized, recipe.candidate_op_types, ())


def test_returning_every_candidate_to_float_gives_the_float_model_back(tiny_bert: TinyBert, tmp_path: Path) -> None:
    float_model, quantized, candidates = _nncf_model(tiny_bert, tmp_path)
    kinds = Counter(node.op_type for node in float_model.graph.node if node.name in candidates)
    assert kinds["MatMul"] > 0 and kinds["Gather"] > 0  # NNCF also stores the embedding tables in int8
    path = tmp_path / "all-float.onnx"
    onnx.save(quantize.returned_to_float(quantized, float_model, candidates), path)
    graph = onnx.load(path).graph
    assert not [node for node in graph.node if node.op_type in ("QuantizeLinear", "DequantizeLinear")]
    for engine in ("openvino", "onnxruntime"):  # weights, activations and NNCF's corrected biases are all float again
        np.testing.assert_allclose(_validation_logits(path, tiny_bert, engine),
                                   _validation_logits(tiny_bert.model_path, tiny_bert, engine), atol=1e-5)


def test_returning_one_node_to_float_leaves_the_others_quantized(tiny_bert: TinyBert, tmp_path: Path) -> None:
    float_model, quantized, candidates = _nncf_model(tiny_bert, tmp_path)
    node = next(name for name in candidates if name.endswith("MatMul"))
    edited = quantize.returned_to_float(onnx.ModelProto.FromString(quantized.SerializeToString()), float_model, [node])
    assert quantize._quantized_nodes(float_model, edited, quantize.NNCF_OP_TYPES, ()) == [n for n in candidates if n != node]
    original = next(n for n in float_model.graph.node if n.name == node)
    assert list(next(n for n in edited.graph.node if n.name == node).input) == list(original.input)


def test_an_impossible_budget_makes_the_search_return_nodes_to_float_under_openvino(tiny_bert: TinyBert, tmp_path: Path) -> None:
    # A drop below zero: int8 must beat the float model (NNCF's int8 agrees with the tiny model on every row here).
    options = _options(min_top1_agreement=1.0, max_accuracy_drop_points=-1.0, evaluation_samples=100, time_limit_s=0.001)
    result = quantize.run(artifact_for(tiny_bert), options, context_for(tiny_bert, tmp_path))
    report = result.results.quantization.model_dump()
    assert [trial["kept_in_float_count"] for trial in report["trials"]][:2] == [0, 1]  # all-int8, then the one step allowed
    # The probe ranks NNCF's nodes: its float twins read the activations NNCF's quantizers read.
    errors = [entry["relative_error"] for entry in report["sensitivity"]]
    # Each twin reads the float weights, not the ones SmoothQuant rescaled in place: int8 errors, not the smoothing's.
    assert errors and 0 < errors[0] < 0.5 and sorted(errors, reverse=True) == errors
    assert report["float_costs"]["unit"] == "weight elements (estimated)"
    assert report["precision_fallback"]["used"] is False and result.precision == "int8"
    open_runner(result.model_path, "openvino")  # whichever candidate won, OpenVINO compiles it


def test_a_convolutional_model_gets_nncfs_default_preset_and_runs_on_openvino(tiny_bert: TinyBert, tmp_path: Path) -> None:
    import dataclasses

    cnn = dataclasses.replace(tiny_bert, model_path=export_text_cnn(tmp_path / "cnn", len(tiny_bert.task.labels)))
    options = _options(min_top1_agreement=0.0, max_accuracy_drop_points=100.0, evaluation_samples=100)
    result = quantize.run(artifact_for(cnn), options, context_for(cnn, tmp_path / "out"))
    assert (result.results.quantization.quantizer, result.precision) == ("nncf", "int8")
    graph = onnx.load(result.model_path).graph
    producers = {out: node for node in graph.node for out in node.output}
    conv = next(node for node in graph.node if node.op_type == "Conv")
    activation = producers[conv.input[0]]
    while activation.op_type in ("Transpose", "Reshape", "Gather"):  # NNCF quantizes before layout changes and lookups
        activation = producers[activation.input[0]]
    assert (activation.op_type, producers[conv.input[1]].op_type) == ("DequantizeLinear", "DequantizeLinear")  # int8 both
    assert not [node for node in graph.node if node.name.endswith("nncf_smooth_quant")]  # no transformer preset without attention
    assert _validation_logits(result.model_path, cnn, "openvino").shape == (100, len(tiny_bert.task.labels))


def _profile(**changes) -> dict:
    document = yaml.safe_load((ROOT / "targets" / f"{TARGET}.yaml").read_text())
    for dotted, value in changes.items():
        section, key = dotted.split(".")
        document[section][key] = value
    return document


@pytest.mark.parametrize(("changes", "message"), [
    ({"quantization.scheme": "dynamic"}, "use quantization.scheme 'static_qdq'"),
    ({"quantization.symmetric_activations": True}, "NNCF's transformer preset"),
])
def test_an_openvino_profile_states_the_recipe_nncf_runs(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TargetProfile.model_validate(_profile(**changes))


def test_the_openvino_engine_runs_on_x86_cpus_only() -> None:
    document = _profile()
    document["cpu_arch"] = "aarch64"
    with pytest.raises(ValueError, match="x86_64 CPUs"):
        TargetProfile.model_validate(document)
