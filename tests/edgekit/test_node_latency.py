"""edgekit.node_latency and the quantize search's use of it: each node cut out and timed alone, in float and int8."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgekit import node_latency
from edgekit.config import BuildConfig
from edgekit.passes import quantize
from edgekit.targets import load_target
from edgekit.tasks import model_feeds
from tests.support.tiny_bert import TinyBert, build_tiny_bert


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> TinyBert:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def _dynamic_setup(tiny_bert: TinyBert, tmp_path: Path) -> tuple[onnx.ModelProto, quantize.Quantizer, list[str], dict]:
    model = onnx.load(tiny_bert.model_path)
    recipe = quantize._recipe_for(quantize.options_for(BuildConfig(), load_target("x86-64-cpu")), model)
    quantizer = quantize.Quantizer(recipe, tiny_bert.model_path, None)
    quantizer.write((), tmp_path / "all-int8.onnx")
    candidates = quantize._quantized_nodes(model, onnx.load(tmp_path / "all-int8.onnx"), recipe.candidate_op_types, ())
    feeds = model_feeds(tiny_bert.task, tiny_bert.data.val.inputs[:1], pad_to_max_length=True)
    return model, quantizer, candidates, feeds


def test_a_node_cut_out_alone_computes_what_it_computes_in_the_model(tiny_bert: TinyBert, tmp_path: Path) -> None:
    model, _, candidates, feeds = _dynamic_setup(tiny_bert, tmp_path)
    seen = node_latency.node_inputs(model, candidates, feeds)
    by_name = {node.name: node for node in model.graph.node}
    whole = onnx.ModelProto()
    whole.CopyFrom(model)
    outputs = [by_name[name].output[0] for name in candidates]
    whole.graph.output.extend(node_latency._untyped(value) for value in outputs)
    session = ort.InferenceSession(whole.SerializeToString(), providers=["CPUExecutionProvider"])
    inside = dict(zip(outputs, session.run(outputs, {k: v for k, v in feeds.items() if k in {i.name for i in session.get_inputs()}}), strict=True))
    for name in candidates:
        alone = ort.InferenceSession(node_latency.single_node_model(model, name, seen[name]).SerializeToString(), providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(alone.run(None, seen[name])[0], inside[by_name[name].output[0]], rtol=1e-5, atol=1e-5)


def test_every_candidate_gets_a_measured_gain_shared_by_nodes_of_one_shape(tiny_bert: TinyBert, tmp_path: Path) -> None:
    model, quantizer, candidates, feeds = _dynamic_setup(tiny_bert, tmp_path)
    gains = node_latency.quantization_gains(model, candidates, feeds,
                                            lambda source, output: dataclasses.replace(quantizer, source=source).write((), output),
                                            tmp_path / "timing")
    assert set(gains) == set(candidates) and all(math.isfinite(gain) for gain in gains.values())
    # The two layers' query projections have one shape: timed once, one number.
    queries = [name for name in candidates if "attention/self/query" in name]
    assert len(queries) == 2 and gains[queries[0]] == gains[queries[1]]
    assert not list((tmp_path / "timing").iterdir())  # the one-node models are cleaned up


def test_the_search_returns_nodes_to_float_by_error_per_unit_of_cost() -> None:
    ranking = [("heavy", 0.4), ("light", 0.3), ("unseen", float("nan")), ("free", 0.01)]
    costs = {"heavy": 1.0, "light": 0.1, "unseen": 0.5, "free": 0.0}
    # free: 0.01 per (almost) nothing; light: 3 per ms; heavy: 0.4 per ms; unseen: last
    assert quantize._cheapest_fix_first(ranking, costs) == ["free", "light", "heavy", "unseen"]


def test_the_dynamic_search_reports_measured_float_costs(tiny_bert: TinyBert, tmp_path: Path) -> None:
    from tests.support.tiny_bert import artifact_for, context_for

    options = quantize.options_for(BuildConfig(), load_target("x86-64-cpu"))
    options = options.model_copy(update={"min_top1_agreement": 1.0, "max_accuracy_drop_points": 0.0,
                                         "search": options.search.model_copy(update={"time_limit_s": 0.001})})
    report = quantize.run(artifact_for(tiny_bert), options, context_for(tiny_bert, tmp_path)).results.quantization.model_dump()
    costs = report["float_costs"]
    assert costs["unit"] == "ms measured on the build host"
    assert set(costs["per_node"]) == {entry["node"] for entry in report["sensitivity"]}
    assert all(cost >= 0 for cost in costs["per_node"].values())
