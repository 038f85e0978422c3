"""The quantize pass on a tiny trained BERT: dynamic and static recipes, the accuracy-aware search, and its failures."""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from edgekit.artifact import Stage
from edgekit.config import BuildConfig, QuantizationSection
from edgekit.data import Split
from edgekit.errors import EdgekitError
from edgekit.passes import quantize
from edgekit.targets import QuantizationSpec, load_target
from tests.support.tiny_bert import TinyBert, artifact_for, build_tiny_bert, context_for, export_text_cnn

# Quantizing the Adds as well puts the attention mask's float32-minimum sentinels into
# calibration: the Add that applies the mask gets a scale near 1e36 and the scores vanish.
QUANTIZE_MASK_PATH = {"keep_mask_path_float": False, "op_types": ("MatMul", "Gemm", "Add")}


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> TinyBert:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def _options(target_name: str, **changes) -> quantize.Options:
    """The target's options with ``changes`` applied wherever the field lives (the recipe, the search or the pass)."""
    options = quantize.options_for(BuildConfig(), load_target(target_name))
    recipe = {k: v for k, v in changes.items() if k in QuantizationSpec.model_fields}
    search = {k: v for k, v in changes.items() if k in QuantizationSection.model_fields and k not in recipe}
    rest = {k: v for k, v in changes.items() if k not in recipe and k not in search}
    return options.model_copy(update={"recipe": options.recipe.model_copy(update=recipe),
                                      "search": options.search.model_copy(update=search), **rest})


def _run(tiny_bert: TinyBert, work_dir: Path, options: quantize.Options, **context):
    return quantize.run(artifact_for(tiny_bert), options, context_for(tiny_bert, work_dir, **context))


def _op_counts(path: Path) -> Counter:
    return Counter(node.op_type for node in onnx.load(path).graph.node)


def _loads_and_runs(artifact, tiny_bert: TinyBert) -> None:
    from device_agent.preprocess import TextTokenizer

    session = ort.InferenceSession(str(artifact.model_path), providers=["CPUExecutionProvider"])
    logits = session.run(None, TextTokenizer(tiny_bert.task.tokenizer_file, tiny_bert.task.max_length).encode(["a small dog"]))[0]
    assert logits.shape == (1, len(tiny_bert.task.labels))


def test_options_come_from_the_target_budgets_and_build_config() -> None:
    config = BuildConfig(quantization=QuantizationSection(time_limit_s=42, calibration_method="percentile", evaluation_samples=50))
    options = quantize.options_for(config, load_target("jetson-orin-nano-8gb"))
    recipe = options.recipe
    assert (recipe.scheme, recipe.activation_type, recipe.symmetric_activations, recipe.per_channel) == ("static_qdq", "int8", True, True)
    assert recipe == load_target("jetson-orin-nano-8gb").quantization.model_copy(update={"calibration_method": "percentile"})
    assert (options.search.time_limit_s, options.search.evaluation_samples) == (42, 50)
    assert (options.max_accuracy_drop_points, options.min_top1_agreement) == (1.0, 0.99)
    assert quantize.options_for(config, None).recipe.scheme == "none"
    with pytest.raises(ValueError, match="extra"):
        quantize.Options(recipe={"scheme": "dynamic", "bits": 4})


# The random tiny BERT's margins are tiny, so int8 flips a few of its rows; the recipes' mechanics, not the budget, are
# what the next tests check: at 0.98 the search accepts its int8 models.
MECHANICS = {"min_top1_agreement": 0.98}


def test_dynamic_int8_for_the_x86_cpu_target(tiny_bert: TinyBert, tmp_path: Path) -> None:
    result = _run(tiny_bert, tmp_path, _options("x86-64-cpu", **MECHANICS))
    assert (result.stage, result.precision, result.model_path) == (Stage.QUANTIZED, "int8", tmp_path / "model.onnx")
    assert result.float_model == tiny_bert.model_path
    ops = _op_counts(result.model_path)
    assert ops["MatMulInteger"] > 0 and ops["DynamicQuantizeLinear"] > 0
    _loads_and_runs(result, tiny_bert)
    report = result.results.quantization.model_dump()
    assert report["scheme"] == "dynamic" and report["calibration_rows"] == 0
    assert 0.0 <= report["top1_agreement"] <= 1.0 and report["evaluation_rows"] == 400
    assert report["accuracy_drop_points"] == pytest.approx((report["float_accuracy"] - report["quantized_accuracy"]) * 100)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_static_symmetric_qdq_for_jetson_leaves_the_mask_path_float(tiny_bert: TinyBert, tmp_path: Path) -> None:
    result = _run(tiny_bert, tmp_path, _options("jetson-orin-nano-8gb", **MECHANICS))
    assert result.precision == "int8"
    model = onnx.load(result.model_path)
    ops = Counter(node.op_type for node in model.graph.node)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0
    initializers = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    dequantizers = [node for node in model.graph.node if node.op_type == "DequantizeLinear"]
    zero_points = [initializers[node.input[2]] for node in dequantizers if node.input[2] in initializers]
    assert zero_points and all(not zp.any() for zp in zero_points)  # symmetric: every zero point is 0
    assert {zp.dtype for zp in zero_points} <= {np.dtype(np.int8), np.dtype(np.int32)}  # int8 tensors, int32 biases
    weight_scales = [initializers[node.input[1]] for node in dequantizers if node.input[0].endswith("_quantized") and initializers[node.input[0]].ndim == 2]
    assert weight_scales and all(scale.ndim == 1 and scale.size > 1 for scale in weight_scales)  # per output channel
    mask_values = _mask_values(onnx.load(tiny_bert.model_path).graph)
    assert not [node.name for node in model.graph.node if node.op_type == "QuantizeLinear" and node.input[0] in mask_values]
    report = result.results.quantization.model_dump()
    assert (report["calibration_method"], report["calibration_rows"]) == ("minmax", 200)
    assert (report["activation_type"], report["symmetric_activations"], report["per_channel"]) == ("int8", True, True)
    _loads_and_runs(result, tiny_bert)


def _mask_values(graph: onnx.GraphProto) -> set[str]:
    path = set(quantize._mask_path_nodes(graph))
    assert any(name.endswith("attention/self/Add") for name in path)  # the walk reaches the Adds that apply the mask
    return {"attention_mask"} | {out for node in graph.node if node.name in path for out in node.output}


def test_accuracy_aware_search_returns_the_most_sensitive_nodes_to_float(tiny_bert: TinyBert, tmp_path: Path) -> None:
    options = _options("jetson-orin-nano-8gb", **QUANTIZE_MASK_PATH, min_top1_agreement=0.95, max_accuracy_drop_points=2.0)
    result = _run(tiny_bert, tmp_path, options)
    report = result.results.quantization.model_dump()
    naive = report["trials"][0]
    assert naive["kept_in_float_count"] == 0 and naive["agreement"] < 0.95  # quantizing the mask breaks the model
    assert report["budget_met"] and report["top1_agreement"] >= 0.95
    assert result.kept_in_float and result.kept_in_float == tuple(report["kept_in_float"])
    # The Adds that apply the attention mask are the culprits: the probe ranks them first, the search returns them first.
    mask_adds = {"/inner/bert/encoder/layer.0/attention/self/Add", "/inner/bert/encoder/layer.1/attention/self/Add"}
    assert {entry["node"] for entry in report["sensitivity"][:2]} == mask_adds
    assert all(entry["relative_error"] > 0.5 for entry in report["sensitivity"][:2])
    assert result.kept_in_float[0] in mask_adds
    assert result.precision == "int8" and report["quantized_nodes"] > 0
    _loads_and_runs(result, tiny_bert)


def test_an_impossible_budget_still_writes_the_best_model_and_lists_the_trade_offs(tiny_bert: TinyBert, tmp_path: Path) -> None:
    options = _options("jetson-orin-nano-8gb", **QUANTIZE_MASK_PATH, min_top1_agreement=1.0, max_accuracy_drop_points=-1.0,
                       time_limit_s=0.001)  # a drop below zero: int8 must beat the float model, which no fallback does either
    result = _run(tiny_bert, tmp_path, options)
    report = result.results.quantization.model_dump()
    assert result.model_path.is_file() and report["budget_met"] is False
    assert len(report["trials"]) == 2  # the naive model, then the one step a tiny time limit still allows
    assert set(report["trials"][0]) >= {"kept_in_float_count", "accuracy", "agreement", "seconds"}
    best = max(report["trials"], key=lambda trial: (trial["agreement"], trial["accuracy"]))
    assert report["top1_agreement"] == best["agreement"]
    assert result.kept_in_float and all(isinstance(name, str) and name for name in result.kept_in_float)
    assert not (tmp_path / "candidate.onnx").exists()
    assert [tried["precision"] for tried in report["precision_fallback"]["tried"]] == ["fp16", "fp32"]
    assert report["precision_fallback"]["used"] is False and result.precision == "int8"
    _loads_and_runs(result, tiny_bert)


def test_the_search_ranks_dynamic_int8_nodes_too(tiny_bert: TinyBert, tmp_path: Path) -> None:
    options = _options("x86-64-cpu", min_top1_agreement=1.0, max_accuracy_drop_points=0.0, time_limit_s=0.001)
    report = _run(tiny_bert, tmp_path, options).results.quantization.model_dump()
    ranked = [entry["node"] for entry in report["sensitivity"]]
    assert any(name.endswith("Gather") for name in ranked) and any(name.endswith("Gemm") for name in ranked)
    assert all(entry["relative_error"] is not None for entry in report["sensitivity"])  # the probe saw every node
    # the plain model, SmoothQuant at three alphas, then the one step a tiny time limit still allows
    assert [trial["kept_in_float_count"] for trial in report["trials"]] == [0, 0, 0, 0, 1]


@pytest.mark.parametrize("rows", [0, 5])
def test_calibration_without_enough_rows_is_a_clear_user_error(tiny_bert: TinyBert, tmp_path: Path, rows: int) -> None:
    calibration = tiny_bert.data.calibration.head(rows)
    data = dataclasses.replace(tiny_bert.data, calibration=Split(calibration.texts, calibration.labels))
    with pytest.raises(EdgekitError, match=rf"at least 16 rows, but would use {rows} .*calibration_path"):
        _run(tiny_bert, tmp_path, _options("jetson-orin-nano-8gb"), data=data)
    assert not (tmp_path / "model.onnx").exists()


def test_entropy_that_fails_on_the_mask_falls_back_to_percentile(tiny_bert: TinyBert, tmp_path: Path) -> None:
    options = _options("jetson-orin-nano-8gb", **QUANTIZE_MASK_PATH, calibration_method="entropy", accuracy_aware=False)
    report = _run(tiny_bert, tmp_path, options).results.quantization.model_dump()
    assert (report["requested_calibration_method"], report["calibration_method"]) == ("entropy", "percentile")
    assert "Too many bins" in report["calibration_fallback"]
    assert len(report["trials"]) == 1  # not accuracy-aware: judged, but no search


def test_scheme_none_keeps_the_float_model(tiny_bert: TinyBert, tmp_path: Path) -> None:
    result = _run(tiny_bert, tmp_path, quantize.Options())
    assert (result.precision, result.kept_in_float, result.results.quantization.model_dump()["scheme"]) == ("fp32", (), "none")
    assert _op_counts(result.model_path) == _op_counts(tiny_bert.model_path)


def test_dynamic_int8_never_quantizes_convolutions(tiny_bert: TinyBert, tmp_path: Path) -> None:
    cnn = dataclasses.replace(tiny_bert, model_path=export_text_cnn(tmp_path / "cnn", len(tiny_bert.task.labels)))
    result = _run(cnn, tmp_path / "out", _options("x86-64-cpu", accuracy_aware=False, fallback=()))  # the int8 recipe itself
    report = result.results.quantization.model_dump()
    assert (report["requested_scheme"], report["scheme"], report["activation_type"]) == ("dynamic", "static_qdq", "uint8")
    assert "Conv" in report["note"]
    ops = _op_counts(result.model_path)
    assert ops["ConvInteger"] == 0 and ops["QuantizeLinear"] > 0


def test_the_search_accepts_a_candidate_only_when_the_test_gate_would_pass_with_95_percent_probability() -> None:
    """At 400 validation and 800 test rows and a 0.99 budget, no flip is accepted and one is not (the point estimate
    would allow 4, the Wilson bound at z = 1 used before allowed 2); more rows allow more."""
    from edgekit.passes.quantize import Budget, Trial

    def trial(flips: int, rows: int = 400) -> Trial:
        return Trial((), accuracy=0.8, agreement=(rows - flips) / rows, seconds=0.0)

    budget = Budget(float_accuracy=0.8, max_drop_points=1.0, min_agreement=0.99, rows=400, test_rows=800)
    assert budget.test_gate_probability(trial(0)) == pytest.approx(0.992, abs=1e-3)
    assert budget.test_gate_probability(trial(1)) == pytest.approx(0.943, abs=1e-3)
    assert budget.met_by(trial(0)) and not budget.met_by(trial(1)) and not budget.met_by(trial(2))
    larger = Budget(float_accuracy=0.8, max_drop_points=1.0, min_agreement=0.99, rows=1000, test_rows=1000)
    assert larger.met_by(trial(4, 1000)) and not larger.met_by(trial(5, 1000))
    assert budget.agreement_bound(trial(0)) > budget.agreement_bound(trial(2))


def test_the_predicted_pass_probability_matches_a_simulation() -> None:
    """The beta-binomial formula against drawing flip rates from the posterior and test flips from them."""
    from edgekit.measure import predicted_pass_probability

    rng = np.random.default_rng(0)
    rates = rng.beta(2 + 0.5, 300 - 2 + 0.5, size=200_000)
    simulated = float(np.mean(rng.binomial(600, rates) <= 6))
    assert predicted_pass_probability(2, 300, 600, 0.99) == pytest.approx(simulated, abs=0.005)


def test_int8_that_breaks_the_budget_falls_back_to_the_targets_next_precision(tiny_bert: TinyBert, tmp_path: Path) -> None:
    """x86-64-cpu falls back to fp32 (int8 -> fp32); a Jetson profile tries fp16 first (int8 -> fp16 -> fp32)."""
    impossible_for_int8 = {"min_top1_agreement": 1.0, "max_accuracy_drop_points": 0.0, "time_limit_s": 0.001}
    result = _run(tiny_bert, tmp_path / "x86", _options("x86-64-cpu", **impossible_for_int8))
    report = result.results.quantization.model_dump()
    assert report["budget_met"] is False  # the int8 search's own verdict stays on record
    assert report["precision_fallback"] == {"used": True, "precision": "fp32", "tried": report["precision_fallback"]["tried"]}
    assert result.precision == "fp32" and result.kept_in_float == ()
    assert "MatMulInteger" not in _op_counts(result.model_path) and "DynamicQuantizeLinear" not in _op_counts(result.model_path)
    _loads_and_runs(result, tiny_bert)

    jetson = _run(tiny_bert, tmp_path / "jetson", _options("jetson-orin-nano-8gb", **QUANTIZE_MASK_PATH, **impossible_for_int8))
    tried = jetson.results.quantization.precision_fallback["tried"]
    assert tried[0]["precision"] == "fp16" and jetson.precision in ("fp16", "fp32")
    if jetson.precision == "fp16":
        weights = [init for init in onnx.load(jetson.model_path).graph.initializer if init.data_type == onnx.TensorProto.FLOAT16]
        assert weights, "an fp16 fallback stores fp16 weights"


def test_the_precision_fallback_comes_from_the_target() -> None:
    assert quantize.options_for(BuildConfig(), load_target("x86-64-cpu")).fallback == ("fp32",)
    assert quantize.options_for(BuildConfig(), load_target("jetson-orin-nano-8gb")).fallback == ("fp16", "fp32")


def test_the_revert_pass_quantizes_float_nodes_again_costliest_first(tiny_bert: TinyBert, tmp_path: Path) -> None:
    from edgekit.passes.quantize import Budget, Judge, Quantizer, Search, _input_names, _quantized_nodes, _recipe_for, _requantize_costliest_first
    from edgekit.passes.quantize import _weight_elements
    from tests.support.tiny_bert import context_for

    options = _options("x86-64-cpu")
    model = onnx.load(tiny_bert.model_path)
    recipe = _recipe_for(options, model)
    judge = Judge.for_float_model(tiny_bert.model_path, _input_names(model.graph), tiny_bert.task, tiny_bert.data.val.head(100), recipe.scheme)
    budget = Budget(judge.float_accuracy, max_drop_points=100.0, min_agreement=1.0, rows=100)  # only flip-free models pass
    quantizer = Quantizer(recipe, tiny_bert.model_path, None)
    quantizer.write((), tmp_path / "all-int8.onnx")
    candidates = _quantized_nodes(model, onnx.load(tmp_path / "all-int8.onnx"), recipe.candidate_op_types, ())
    search = Search(quantizer, judge, budget, tmp_path / "model.onnx")
    assert search.budget.met_by(search.try_keeping(candidates))  # the search's starting point: all float, no flips
    weights = _weight_elements(model)
    _requantize_costliest_first(search, weights, time.perf_counter() + 300, context_for(tiny_bert, tmp_path))
    kept, tried = list(candidates), []
    for trial in search.trials[1:]:  # each revert trial drops one node from the float set accepted so far
        (dropped,) = set(kept) - set(trial.kept_in_float)
        assert set(trial.kept_in_float) == set(kept) - {dropped}
        tried.append(dropped)
        if budget.met_by(trial) and trial.agreement >= 1.0:  # no more flips than the all-float start
            kept = list(trial.kept_in_float)
    assert tried == sorted(candidates, key=lambda name: -weights[name])  # costliest first, each tried once
    assert set(search.best.kept_in_float) == set(kept) and len(kept) < len(candidates)  # some came back to int8
    assert budget.met_by(search.best)


def test_smoothing_is_a_float_equivalent_rewrite(tiny_bert: TinyBert) -> None:
    from edgekit import smoothing
    from edgekit.tasks import model_feeds

    model = onnx.load(tiny_bert.model_path)
    texts = tiny_bert.data.calibration.inputs[:8]
    maxima = smoothing.input_channel_maxima(model, (model_feeds(tiny_bert.task, texts[i:i + 1]) for i in range(len(texts))))
    nodes = smoothing.smoothable(model)
    assert nodes and set(maxima) == {node.input[0] for node in nodes}
    smoothed = smoothing.smoothed(model, maxima, alpha=0.7)
    onnx.checker.check_model(smoothed)
    assert sum(node.op_type == "Mul" and node.name.endswith(smoothing.SUFFIX) for node in smoothed.graph.node) == len(nodes)
    feeds = model_feeds(tiny_bert.task, tiny_bert.data.val.inputs[:32])
    before, after = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
                     for m in (model, smoothed))
    np.testing.assert_allclose(after, before, atol=1e-4)
    # ... and the channels' ranges really came closer together: the spread (max / median channel) of every input fell.
    after_maxima = smoothing.input_channel_maxima(smoothed, (model_feeds(tiny_bert.task, texts[i:i + 1]) for i in range(len(texts))))
    for node, smoothed_node in zip(nodes, smoothing.smoothable(smoothed), strict=True):
        spread_before = maxima[node.input[0]].max() / np.median(maxima[node.input[0]])
        spread_after = after_maxima[smoothed_node.input[0]].max() / np.median(after_maxima[smoothed_node.input[0]])
        assert spread_after < spread_before, node.name


def test_dynamic_int8_that_misses_the_budget_tries_smoothquant(tiny_bert: TinyBert, tmp_path: Path) -> None:
    options = _options("x86-64-cpu", min_top1_agreement=1.0, max_accuracy_drop_points=0.0, time_limit_s=0.001, fallback=())
    result = _run(tiny_bert, tmp_path, options)
    report = result.results.quantization.model_dump()
    smoothing = report["smoothing"]
    assert [tried["alpha"] for tried in smoothing["tried"]] == [0.5, 0.7, 0.85] and smoothing["calibration_rows"] > 0
    sources = [trial["source"] for trial in report["trials"]]
    assert sources[:4] == ["plain", "smoothed, alpha 0.5", "smoothed, alpha 0.7", "smoothed, alpha 0.85"]
    best = max(report["trials"][:4], key=lambda trial: (trial["agreement"], trial["accuracy"]))
    if smoothing["alpha"] is not None:  # the chosen source's Mul nodes are in the model written
        assert any(node.name.endswith("_smooth") for node in onnx.load(result.model_path).graph.node)
        assert best["source"] == f"smoothed, alpha {smoothing['alpha']}"
    _loads_and_runs(result, tiny_bert)
