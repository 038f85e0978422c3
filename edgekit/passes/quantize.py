"""The quantize pass: a float ONNX text classifier to the target's int8 recipe, judged against its float parent.

Three schemes, chosen by the target profile:

- ``none``: the model stays float (fp16 conversion is the optimize pass's job).
- ``dynamic`` (CPU targets): ONNX Runtime's ``quantize_dynamic``, int8 weights and
  activations quantized at run time. Never for convolutions: ORT's dynamic path
  has no int8 conv kernels (measured 5-8x slower than fp32), so a graph with Conv
  falls back to static QDQ with uint8 activations.
- ``static_qdq`` for OpenVINO targets: NNCF's post-training quantization of the
  ONNX graph (mixed preset; ``model_type=TRANSFORMER``, with its SmoothQuant and
  fast bias correction, where the graph has attention), calibrated on the
  calibration rows one per run, as the device sees them; QDQ pairs that
  OpenVINO's CPU plugin runs on int8 kernels (measured against ONNX Runtime's
  own recipes: bench/README.md, "Build pipeline"). The node search returns
  nodes of that one model to float (``returned_to_float``).
- ``static_qdq`` otherwise: ``quantize_static`` in QDQ format, calibrated on the build's
  tokenized calibration texts. Only MatMul/Gemm/Conv are quantized, and the
  attention-mask path stays float: its float32-minimum sentinels (about -3.4e38)
  would give the scores a scale near 1e36 and wipe them out (measured: bench/README.md).
  Nodes whose output a comparison reads (Greater, Less, ...; through reshapes) stay
  float too: a quantization step near the threshold flips the result, and a flip is
  no small error (MiniRocket's convolutions against their biases: bench/README.md).

When ``accuracy_aware`` is on and the quantized model breaks the budget (accuracy
drop in points, top-1 agreement with the float parent), quantized nodes are ranked
by their own quantization error in one probe run, and returned to float, most error
per unit of cost first, until the budget holds; a node's cost is the time its int8
form saves, measured on the node alone on this host (``edgekit.node_latency``). Then
a revert pass tries to quantize each of those again, costliest first, keeping the
ones that add no flips, until the time limit ends the search. The best model found
is always written; the quantize record's ``budget_met`` says whether it meets the budget. When no int8 model meets
it, the target's fallback precisions are tried in order (``_fall_back``); the
build's gate decides what to do with the result.

Candidates are judged with the target's engine on this host (``edgekit.engines``):
OpenVINO for openvino targets, ONNX Runtime's CPU provider otherwise.

A graph with no node of a type either scheme quantizes (a tree ensemble: its
thresholds and leaf values are no matrix product) stays fp32 without a trial:
the record's note says why, and the precision says fp32, never int8.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
from onnx import numpy_helper
from onnxruntime.quantization.registry import IntegerOpsRegistry
from pydantic import BaseModel, ConfigDict, Field

from edgekit import measure
from edgekit.artifact import Artifact, Pass, PassContext, Stage, TaskSpec
from edgekit.config import BuildConfig, QuantizationSection
from edgekit.errors import EdgekitError
from edgekit.results import QuantizeResult
from edgekit.targets import QuantizationSpec, TargetProfile
from edgekit.data import MIN_CALIBRATION_ROWS, Split
from edgekit.tasks import model_feeds

MODEL_FILE = "model.onnx"
SCRATCH_DIR = "scratch"  # the search's intermediate float graphs and one-node models, removed when it ends
STATIC_OP_TYPES = ("MatMul", "Gemm", "Conv")
NNCF_OP_TYPES = (*STATIC_OP_TYPES, "Gather")  # NNCF also stores embedding tables in int8 (weights only)
# quantize_dynamic rewrites Gemm as MatMul + Add before quantizing it, so Gemm counts as quantizable there too.
DYNAMIC_OP_TYPES = tuple(sorted({*IntegerOpsRegistry, "Gemm"}))
MASK_INPUT = "attention_mask"
BATCH_ROWS = 32  # rows per inference batch when calibrating, and when judging a batch-invariant model
SMOOTHING_ALPHAS = (0.5, 0.7, 0.85)  # SmoothQuant's migration strength: tried in turn, judged on validation
SMOOTHING_ROWS = 64  # calibration rows whose activation ranges set the smoothing scales
SEARCH_CONFIDENCE = 0.95  # a candidate must pass the test split's agreement gate with this predicted probability (class Budget)
PROBE_ROWS = 16  # calibration rows of the sensitivity probe: one batch is enough to rank nodes
_SHAPE_OPS = frozenset({"Shape", "Size"})  # their outputs are metadata, not values derived from an input
_COMPARISON_OPS = frozenset({"Greater", "GreaterOrEqual", "Less", "LessOrEqual", "Equal"})
_LAYOUT_OPS = frozenset({"Unsqueeze", "Squeeze", "Reshape", "Flatten", "Transpose", "Identity"})  # move values, change none
_MASK_SENTINEL = 1e30  # |value| above this is an attention-mask sentinel (float32 min), kept exactly by quantization
_TWIN_SUFFIX = "__edgekit_float"
_ORT_CALIBRATION = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}
_ORT_TYPES = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
_TREE_OPS = frozenset({"TreeEnsembleClassifier", "TreeEnsembleRegressor", "TreeEnsemble"})  # ai.onnx.ml


class QuantizeError(EdgekitError):
    """The model cannot be quantized with the data or settings given."""


class Options(BaseModel):
    """How to quantize: the target's recipe (with the build's calibration method, if it sets one), the build's search
    settings and the target's fidelity budgets."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    recipe: QuantizationSpec = QuantizationSpec(scheme="none")
    float_precision: Literal["fp32", "fp16"] = Field("fp32", description="the model's precision when the scheme is none")
    op_types: tuple[str, ...] = Field(STATIC_OP_TYPES, description="node types static QDQ quantizes")
    keep_mask_path_float: bool = Field(True, description="leave the attention-mask computation and the Adds applying it unquantized")
    search: QuantizationSection = QuantizationSection()
    fallback: tuple[Literal["fp16", "fp32"], ...] = Field((), description="the target's precisions to try, in order, when int8 breaks the budget")
    keep_io_fp32: bool = True
    engine: Literal["onnxruntime", "tensorrt", "openvino"] = Field("onnxruntime", description="the target's runtime: judges the candidates")
    max_accuracy_drop_points: float = Field(1.0, ge=0)
    min_top1_agreement: float = Field(0.99, ge=0, le=1)


def options_for(config: BuildConfig, target: TargetProfile | None) -> Options:
    """The target's recipe and budgets, with the build config's search settings and calibration override."""
    if target is None:
        return Options()
    spec, search = target.quantization, config.quantization
    return Options(
        recipe=spec.model_copy(update={"calibration_method": search.calibration_method or spec.calibration_method}),
        float_precision="fp32" if target.precision.preferred == "int8" else target.precision.preferred,
        search=search.model_copy(update={"calibration_method": None}),  # folded into the recipe
        fallback=tuple(p for p in target.precision.fallback if p != "int8") if target.precision.preferred == "int8" else (),
        keep_io_fp32=target.precision.keep_io_fp32,
        engine=target.runtime.engine,
        max_accuracy_drop_points=target.budgets.max_accuracy_drop_points,
        min_top1_agreement=target.budgets.min_top1_agreement,
    )


def run(artifact: Artifact, options: Options, ctx: PassContext) -> Artifact:
    """Write ``ctx.work_dir/model.onnx`` at the target's precision and report how it compares with the float parent."""
    ctx.work_dir.mkdir(parents=True, exist_ok=True)
    output = ctx.work_dir / MODEL_FILE
    if options.recipe.scheme == "none":
        return _keep_float(artifact, options, output)
    started = time.perf_counter()
    float_model = onnx.load(artifact.model_path)
    nothing = _nothing_to_quantize(float_model.graph)
    if nothing:
        ctx.say(f"quantize: {nothing}; the model stays {options.float_precision}")
        return _keep_float(artifact, options, output, requested_scheme=options.recipe.scheme, note=nothing)
    recipe = _recipe_for(options, float_model)
    if recipe.note:
        ctx.say(f"quantize: {recipe.note}")
    inputs = _input_names(float_model.graph)
    # Judged against the customized float model: after quantization-aware training that is not the model quantized here.
    reference = artifact.float_model or artifact.model_path
    judge = Judge.for_float_model(reference, inputs, artifact.task, _evaluation_split(ctx, options), recipe.scheme, options.engine)
    # Only calibrated scales suffer from the mask's sentinels: dynamic int8 measures its ranges on each run.
    mask_path = _mask_path_nodes(float_model.graph) if options.keep_mask_path_float and recipe.scheme == "static_qdq" else ()
    mask_path = tuple(dict.fromkeys([*mask_path, *_compared_nodes(float_model.graph)]))  # both stay float from the start
    calibration = _calibrate(recipe, artifact, inputs, ctx, mask_path) if recipe.scheme == "static_qdq" and recipe.tool == "onnxruntime" else None
    nncf = _nncf_quantize(recipe, artifact, inputs, mask_path, ctx) if recipe.tool == "nncf" else None
    budget = Budget(judge.float_accuracy, options.max_accuracy_drop_points, options.min_top1_agreement, len(judge.labels),
                    len(ctx.data.test))
    search = Search(Quantizer(recipe, artifact.model_path, calibration, base_exclusions=mask_path, nncf=nncf), judge, budget, output)
    search.try_keeping(())
    candidates = _quantized_nodes(float_model, onnx.load(output), recipe.candidate_op_types, mask_path)
    smoothing = None
    if recipe.scheme == "dynamic" and options.search.smoothing and not budget.met_by(search.best):
        smoothing, float_model = _try_smoothing(search, float_model, artifact.task, ctx)
    ranking: list[tuple[str, float]] = []
    costs = None
    if options.search.accuracy_aware and not budget.met_by(search.best):
        deadline = time.perf_counter() + options.search.time_limit_s
        costs = _float_costs(search.quantizer, float_model, candidates, artifact.task, ctx)
        ranking = _rank_by_sensitivity(float_model, output, candidates, _probe_inputs(artifact.task, ctx.data.calibration))
        _return_sensitive_nodes_to_float(search, _cheapest_fix_first(ranking, costs.per_node), deadline, ctx)
        _requantize_costliest_first(search, costs.per_node, deadline, ctx)
    search.discard_scratch()
    shutil.rmtree(ctx.work_dir / SCRATCH_DIR, ignore_errors=True)
    best = search.best
    kept_in_float = tuple(_quantizable(float_model, mask_path, recipe.candidate_op_types)) + best.kept_in_float
    report = _report(recipe, calibration, judge, budget, search, ranking, kept_in_float, candidates, started)
    report["smoothing"] = smoothing
    report["float_costs"] = dataclasses.asdict(costs) if costs else None
    ctx.say(_summary(recipe, best, budget, len(kept_in_float)))
    precision = "int8" if len(best.kept_in_float) < len(candidates) else "fp32"
    if not budget.met_by(best) and options.fallback:
        # The float source: the reference itself when quantization-aware training changed the weights quantized here.
        fallback = _fall_back(reference if artifact.float_model else artifact.model_path, options, judge, budget, output, ctx)
        report["precision_fallback"] = fallback
        if fallback["used"]:
            precision, kept_in_float = fallback["precision"], ()
    return dataclasses.replace(
        artifact,
        stage=Stage.QUANTIZED,
        directory=ctx.work_dir,
        model_file=MODEL_FILE,
        precision=precision,
        float_model=reference,
        kept_in_float=kept_in_float,
        results=artifact.recording(quantization=QuantizeResult(**report)),
    )


def _fall_back(source: Path, options: Options, judge: Judge, budget: Budget, output: Path, ctx: PassContext) -> dict:
    """The target's fallback precisions in order: the first that meets the budget replaces the int8 model at ``output``.

    fp16 is ONNX Runtime's float16 conversion with float32 inputs and outputs when the
    profile keeps them; it is judged here with the CPU execution provider, whose fp16
    arithmetic is a proxy for the GPU's (the evaluate pass says so for non-host targets).
    """
    tried = []
    for precision in options.fallback:
        candidate = output.with_name(f"fallback-{precision}.onnx")
        model = onnx.load(source)
        if precision == "fp16":
            from onnxruntime.transformers.float16 import convert_float_to_float16

            model = convert_float_to_float16(model, keep_io_types=options.keep_io_fp32)
        onnx.save(model, candidate)
        accuracy, agreement = judge.score(candidate)
        trial = Trial((), accuracy, agreement, 0.0)
        tried.append({"precision": precision, "accuracy": accuracy, "agreement": agreement, "budget_met": budget.met_by(trial)})
        if budget.met_by(trial):
            candidate.replace(output)
            ctx.say(f"quantize: int8 broke the budget; the target's fallback {precision} meets it (top-1 agreement {agreement:.4f})")
            return {"used": True, "precision": precision, "tried": tried}
        candidate.unlink()
    return {"used": False, "precision": None, "tried": tried}


# --------------------------------------------------------------------------- recipe


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What ORT is asked to do, after the pass's own rules have been applied to the target's options."""

    scheme: Literal["dynamic", "static_qdq"]
    requested_scheme: str
    weight_type: str
    activation_type: str
    symmetric_weights: bool
    symmetric_activations: bool
    per_channel: bool
    calibration_method: str
    calibration_samples: int
    candidate_op_types: tuple[str, ...]
    tool: Literal["onnxruntime", "nncf"] = "onnxruntime"  # what writes the int8 model
    note: str | None = None


def _recipe_for(options: Options, model: onnx.ModelProto) -> Recipe:
    """The options as a recipe; dynamic int8 on a graph with Conv becomes static QDQ with uint8 activations."""
    spec = options.recipe
    recipe = Recipe(
        scheme=spec.scheme,
        requested_scheme=spec.scheme,
        weight_type=spec.weight_type,
        activation_type=spec.activation_type,
        symmetric_weights=spec.symmetric_weights,
        symmetric_activations=spec.symmetric_activations,
        per_channel=spec.per_channel,
        calibration_method=spec.calibration_method,
        calibration_samples=spec.calibration_samples,
        candidate_op_types=options.op_types,
    )
    if spec.scheme == "static_qdq":
        return dataclasses.replace(recipe, tool="nncf", candidate_op_types=NNCF_OP_TYPES) if options.engine == "openvino" else recipe
    if any(node.op_type == "Conv" for node in model.graph.node):
        note = "the graph has Conv nodes and dynamic int8 has no int8 conv kernels (5-8x slower than fp32); using static QDQ with uint8 activations"
        return dataclasses.replace(recipe, scheme="static_qdq", activation_type="uint8", symmetric_activations=False, candidate_op_types=STATIC_OP_TYPES, note=note)
    # Dynamic quantization computes uint8 activation ranges at run time: there is nothing to calibrate or symmetrise.
    return dataclasses.replace(recipe, activation_type="uint8", symmetric_activations=False, candidate_op_types=DYNAMIC_OP_TYPES)


def _nothing_to_quantize(graph: onnx.GraphProto) -> str | None:
    """Why a graph has no node of a type that static QDQ or dynamic int8 quantizes, or None when it has one."""
    op_types = {node.op_type for node in graph.node}
    if op_types & {*STATIC_OP_TYPES, *DYNAMIC_OP_TYPES}:
        return None
    if op_types & _TREE_OPS:
        return "nothing to quantize: tree ensemble"
    return f"nothing to quantize: no {', '.join(sorted({*STATIC_OP_TYPES, *DYNAMIC_OP_TYPES}))} node"


def _keep_float(artifact: Artifact, options: Options, output: Path, requested_scheme: str | None = None,
                note: str | None = None) -> Artifact:
    # load + save rather than a file copy: it also brings along weights stored as external data.
    onnx.save(onnx.load(artifact.model_path), output)
    why = {"requested_scheme": requested_scheme, "note": note} if note else {}  # only set fields reach the report
    return dataclasses.replace(
        artifact,
        stage=Stage.QUANTIZED,
        directory=output.parent,
        model_file=output.name,
        precision=options.float_precision,
        float_model=artifact.float_model or artifact.model_path,
        kept_in_float=(),
        results=artifact.recording(quantization=QuantizeResult(scheme="none", precision=options.float_precision, **why)),
    )


# --------------------------------------------------------------------------- graph analysis


def _mask_path_nodes(graph: onnx.GraphProto) -> tuple[str, ...]:
    """Nodes computing the additive attention mask from ``attention_mask``, up to and including the nodes that apply it.

    Walks forward from the mask input. A node that also consumes a value derived from
    the other inputs (the attention scores) applies the mask: it is part of the path,
    but the walk stops there. Shape/Size outputs are metadata and carry nothing on.
    """
    if MASK_INPUT not in {value.name for value in graph.input}:
        return ()
    activations = _derived_from(graph, [value.name for value in graph.input if value.name != MASK_INPUT])
    mask_values, path = {MASK_INPUT}, []
    for node in graph.node:  # ONNX stores nodes in topological order
        if node.op_type in _SHAPE_OPS or not mask_values.intersection(node.input):
            continue
        path.append(node.name)
        if not activations.intersection(node.input):
            mask_values.update(node.output)
    return tuple(name for name in path if name)


def _compared_nodes(graph: onnx.GraphProto) -> tuple[str, ...]:
    """Nodes whose output a comparison reads, directly or through layout ops: they stay float (module docstring)."""
    producer = {output: node for node in graph.node for output in node.output}
    found = []
    for node in graph.node:
        if node.op_type not in _COMPARISON_OPS:
            continue
        for name in node.input:
            source = producer.get(name)
            while source is not None and source.op_type in _LAYOUT_OPS:
                source = producer.get(source.input[0])
            if source is not None and source.name:
                found.append(source.name)
    return tuple(dict.fromkeys(found))


def _derived_from(graph: onnx.GraphProto, sources: Sequence[str]) -> set[str]:
    """Every tensor whose value depends on one of ``sources`` (not just on its shape)."""
    reached = set(sources)
    for node in graph.node:
        if node.op_type not in _SHAPE_OPS and reached.intersection(node.input):
            reached.update(node.output)
    return reached


def _quantizable(model: onnx.ModelProto, names: Sequence[str], op_types: Sequence[str]) -> list[str]:
    """Those of ``names`` whose node type the recipe would quantize."""
    op_type_of = {node.name: node.op_type for node in model.graph.node}
    return [name for name in names if op_type_of.get(name) in op_types]


def _quantized_nodes(float_model: onnx.ModelProto, quantized_model: onnx.ModelProto, op_types: Sequence[str], excluded: Sequence[str]) -> list[str]:
    """Float nodes of the recipe's types that quantization replaced (dynamic) or rewired to quantized inputs (QDQ)."""
    after = {node.name: node for node in quantized_model.graph.node}
    names = []
    for node in float_model.graph.node:
        if not node.name or node.name in excluded or node.op_type not in op_types:
            continue
        twin = after.get(node.name)
        if twin is None or twin.op_type != node.op_type or list(twin.input) != list(node.input):
            names.append(node.name)
    return names


# --------------------------------------------------------------------------- data


def rows_per_run(scheme: str) -> int:
    """Rows per model run when a model of this scheme is scored: one for dynamic int8, a batch otherwise.

    Dynamic int8 takes each activation's range over the whole input tensor, so a row's
    result depends on the rows (and the padding) it shares a run with: the LoRA demo's
    all-int8 bundle agrees with fp32 on 99.00% of test rows run one at a time and on
    97.12% in padded batches of 32 (bench/results/int8_fidelity.json). One row per run is what a
    device serving one request at a time computes; the evaluate pass also reports the
    batched agreement. Float and static int8 models give the same answer either way.
    """
    return 1 if scheme == "dynamic" else BATCH_ROWS


def tokenized_batches(task: TaskSpec, texts: Sequence[str] | np.ndarray, input_names: Sequence[str],
                       rows: int = BATCH_ROWS) -> list[dict[str, np.ndarray]]:
    """Raw inputs as the device would feed them (texts padded to the batch's longest row), with only the model's inputs."""
    batches = []
    for start in range(0, len(texts), rows):
        encoded = model_feeds(task, texts[start : start + rows])
        batches.append({name: encoded[name] for name in input_names})
    return batches


def _input_names(graph: onnx.GraphProto) -> list[str]:
    initializers = {init.name for init in graph.initializer}
    return [value.name for value in graph.input if value.name not in initializers]


def _calibration_split(ctx: PassContext, recipe: Recipe) -> Split:
    available = len(ctx.data.calibration)
    rows = ctx.data.calibration.head(recipe.calibration_samples)
    if len(rows) < MIN_CALIBRATION_ROWS:
        raise QuantizeError(
            f"static int8 calibration needs at least {MIN_CALIBRATION_ROWS} rows, but would use {len(rows)} "
            f"({available} in the calibration set, calibration_samples {recipe.calibration_samples}); add rows to "
            "data.calibration_path (or the train split), or raise quantization.calibration_samples in the target profile"
        )
    return rows


def _evaluation_split(ctx: PassContext, options: Options) -> Split:
    rows = ctx.data.val.head(options.search.evaluation_samples)
    if len(rows) == 0:
        raise QuantizeError("judging the quantized model needs validation rows, but the val split is empty; add rows with split 'val' to data.path")
    return rows


def _probe_inputs(task: TaskSpec, calibration: Split) -> dict[str, np.ndarray]:
    return model_feeds(task, calibration.inputs[:PROBE_ROWS])


class _CalibrationBatches(CalibrationDataReader):
    """Tokenized calibration batches for ORT, served one range at a time.

    ``quantize_static`` is run with ``CalibStridedMinMax=1``: it calls ``set_range``
    for each batch and collects it on its own. That keeps memory to one batch of
    intermediate tensors, and lets histogram calibrators (Entropy, Percentile) take
    batches of different sequence lengths, which they cannot stack.
    """

    def __init__(self, batches: list[dict[str, np.ndarray]], on_batch: Callable[[], None]) -> None:
        self._batches = batches
        self._on_batch = on_batch
        self._pending: Iterator[dict[str, np.ndarray]] = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._pending, None)
        if batch is not None:
            self._on_batch()
        return batch

    def __len__(self) -> int:
        return len(self._batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._pending = iter(self._batches[start_index:end_index])


# --------------------------------------------------------------------------- calibration and quantization


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Activation ranges computed once and cached in the work folder, reused by every candidate of the search."""

    method: str
    rows: int
    ranges_file: Path
    fallback: str | None = None  # why the requested method was replaced


def _calibrate(recipe: Recipe, artifact: Artifact, input_names: Sequence[str], ctx: PassContext, mask_path: Sequence[str]) -> Calibration:
    """Compute activation ranges; Entropy that fails (the mask's sentinels break its histogram) falls back to Percentile."""
    rows = _calibration_split(ctx, recipe)
    batches = tokenized_batches(artifact.task, rows.inputs, input_names)
    try:
        return _calibrate_with(recipe.calibration_method, recipe, artifact.model_path, batches, len(rows), ctx, mask_path)
    except ValueError as error:
        if recipe.calibration_method != "entropy" or not _histogram_failed(error):
            raise
        reason = f"entropy calibration failed ({error}); used percentile"
        ctx.say(f"quantize: {reason}")
        try:
            return dataclasses.replace(_calibrate_with("percentile", recipe, artifact.model_path, batches, len(rows), ctx, mask_path), fallback=reason)
        except ValueError as second:
            if not _histogram_failed(second):
                raise
            raise QuantizeError(
                f"calibration failed with entropy ({error}) and with percentile ({second}); "
                "set quantization.calibration_method: minmax in the build config"
            ) from None


@dataclasses.dataclass(frozen=True)
class NncfModel:
    """NNCF's all-int8 QDQ model of the float graph, made once: the search's candidates return nodes of it to float."""

    path: Path
    rows: int  # calibration rows
    float_model: onnx.ModelProto  # the graph NNCF quantized, loaded once: every candidate copies nodes from it


def _nncf_quantize(recipe: Recipe, artifact: Artifact, input_names: Sequence[str], keep_float: Sequence[str], ctx: PassContext) -> NncfModel:
    """Run NNCF's post-training quantization once, calibrated on rows one per run and unpadded (the ranges a device
    serving one request sees), ``keep_float`` ignored; its transformer preset where the graph has attention (Softmax).

    NNCF's defaults for transformers: per-channel symmetric int8 weights, asymmetric uint8 activations, SmoothQuant
    (alpha 0.95) on MatMul inputs, fast bias correction. A call matches NNCF's fusion patterns over the whole graph, too
    slow to repeat per candidate, so the search edits this model instead.
    """
    try:
        import nncf
    except ImportError as exc:
        raise QuantizeError(f"the target's int8 recipe is NNCF's, which does not import here ({exc}); "
                            "install the build extra: pip install \"edgekit[build]\"") from None

    rows = _calibration_split(ctx, recipe)
    feeds = tokenized_batches(artifact.task, rows.inputs, input_names, rows=1)
    model = onnx.load(artifact.model_path)
    # The transformer preset (SmoothQuant, attention patterns) where the graph has attention; NNCF's default otherwise.
    attention = any(node.op_type == "Softmax" for node in model.graph.node)
    task = ctx.progress.add_task("quantize: NNCF calibration" + (" and SmoothQuant" if attention else ""), total=None)
    # NNCF draws its own progress bars on stdout (the pass has its own progress line).
    with _quiet_quantization_tools(), contextlib.redirect_stdout(io.StringIO()):
        try:
            quantized = nncf.quantize(
                model, nncf.Dataset(feeds), preset=nncf.QuantizationPreset.MIXED,  # asymmetric uint8 activations, as the profile says
                model_type=nncf.ModelType.TRANSFORMER if attention else None, subset_size=len(feeds),
                ignored_scope=nncf.IgnoredScope(names=list(keep_float), validate=False),
            )
        except Exception as exc:  # NNCF raises its own exception types for graphs it cannot handle
            raise QuantizeError(f"NNCF could not quantize the model ({type(exc).__name__}: {exc}); build for x86-64-cpu "
                                "(ONNX Runtime's recipe) instead, or set the target's precision to fp32") from None
    ctx.progress.remove_task(task)
    path = ctx.work_dir / SCRATCH_DIR / "nncf-int8.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(quantized, path)
    return NncfModel(path, len(feeds), onnx.load(artifact.model_path))


def returned_to_float(quantized: onnx.ModelProto, float_model: onnx.ModelProto, nodes: Sequence[str]) -> onnx.ModelProto:
    """NNCF's QDQ model with ``nodes`` as they are in the float model: the float node reads the float activations (still
    in the graph: NNCF's QuantizeLinear and SmoothQuant Mul read them) and the float weights, and an Add right after it
    gets its float bias back (NNCF's bias correction shifted it for the int8 node). What nobody reads any more is
    dropped. Edits and returns ``quantized``."""
    graph = quantized.graph
    float_nodes = {node.name: node for node in float_model.graph.node}
    float_constants = {init.name: init for init in float_model.graph.initializer}
    constants = FloatConstants(graph, float_constants)
    position = {node.name: index for index, node in enumerate(graph.node)}
    values = {value.name for value in graph.input} | {out for node in graph.node for out in node.output}
    for name in nodes:
        original = float_nodes.get(name)
        # A node NNCF left alone, or one whose float inputs or output NNCF renamed or folded away, stays as it is.
        if (original is None or name not in position or original.output[0] not in values
                or any(v and v not in values and v not in float_constants for v in original.input)):
            continue
        node = graph.node[position[name]]
        node.CopyFrom(original)
        node.input[:] = [constants.name_for(v) if v in float_constants else v for v in original.input]
        for reader in graph.node:
            if reader.op_type == "Add" and original.output[0] in reader.input:  # its bias, as the float graph has it
                reader.input[:] = [constants.name_for(v) if v in float_constants else v for v in reader.input]
    _drop_unread(graph)
    return quantized


class FloatConstants:
    """Float-model constants a quantized graph's nodes may read again: under their own name where the graph holds
    the same values (or nothing of that name), else under a new name, so that nodes still reading the changed
    constant (NNCF rescales and corrects some in place, and readers may share them) keep it."""

    def __init__(self, graph: onnx.GraphProto, float_constants: dict[str, onnx.TensorProto]) -> None:
        self.graph, self.float_constants = graph, float_constants
        self.held = {init.name: init for init in graph.initializer}
        # Names a node or the graph's inputs define (ONNX Runtime's QDQ names a dequantized bias after the float one).
        self.computed = {out for node in graph.node for out in node.output} | {value.name for value in graph.input}

    def name_for(self, name: str) -> str:
        tensor = self.float_constants[name]
        current = self.held.get(name)
        if current is not None and np.array_equal(numpy_helper.to_array(current), numpy_helper.to_array(tensor)):
            return name
        chosen = name if current is None and name not in self.computed else name + _TWIN_SUFFIX
        if chosen not in self.held:
            copy = onnx.TensorProto()
            copy.CopyFrom(tensor)
            copy.name = chosen
            self.graph.initializer.append(copy)
            self.held[chosen] = copy
        return chosen


def _drop_unread(graph: onnx.GraphProto) -> None:
    """Remove the nodes (ONNX nodes have no side effects) and initializers whose outputs nothing reads any more: the
    quantize/dequantize pairs and SmoothQuant scalings only the nodes returned to float read."""
    outputs = {value.name for value in graph.output}
    while True:
        read = {value for node in graph.node for value in node.input} | outputs
        unread = [node for node in graph.node if not set(node.output) & read]
        if not unread:
            break
        for node in unread:
            graph.node.remove(node)
    for init in [init for init in graph.initializer if init.name not in read]:
        graph.initializer.remove(init)


def _histogram_failed(error: ValueError) -> bool:
    """numpy's histogram refusing a range, e.g. "Too many bins for data range" when a tensor spans about 3.4e38."""
    return "bins" in str(error) or "range" in str(error)


def _calibrate_with(method: str, recipe: Recipe, source: Path, batches: list[dict[str, np.ndarray]], row_count: int, ctx: PassContext, mask_path: Sequence[str]) -> Calibration:
    calibration = Calibration(method, row_count, ranges_file=ctx.work_dir / f"calibration-{method}.json")
    task = ctx.progress.add_task(f"quantize: calibrating ({method}, {row_count} rows)", total=len(batches))
    reader = _CalibrationBatches(batches, lambda: ctx.progress.advance(task))
    # ORT calibrates inside quantize_static: this first call computes and caches the ranges.
    # Its model is scratch; the search writes its own candidates from the cached ranges.
    scratch = ctx.work_dir / "calibration-scratch.onnx"
    try:
        Quantizer(recipe, source, calibration, base_exclusions=tuple(mask_path)).write((), scratch, reader=reader)
    finally:
        scratch.unlink(missing_ok=True)
    return calibration


@dataclasses.dataclass(frozen=True)
class Quantizer:
    """Writes the recipe's int8 model with given nodes kept in float."""

    recipe: Recipe
    source: Path
    calibration: Calibration | None
    base_exclusions: tuple[str, ...] = ()
    nncf: NncfModel | None = None  # the all-int8 model an NNCF recipe's candidates start from

    def write(self, keep_in_float: Sequence[str], output: Path, *, reader: CalibrationDataReader | None = None) -> None:
        exclude = [*self.base_exclusions, *keep_in_float]
        with _quiet_quantization_tools():
            if self.recipe.tool == "nncf":
                self._write_nncf(keep_in_float, output)
            elif self.recipe.scheme == "dynamic":
                self._write_dynamic(exclude, output)
            else:
                self._write_static(exclude, output, reader)

    def _write_dynamic(self, exclude: list[str], output: Path) -> None:
        # quantize_dynamic first rewrites Gemm "X" as MatMul "X_MatMul" + Add, then matches exclusions against the new name.
        exclude = [*exclude, *(f"{name}_MatMul" for name in exclude)]
        quantize_dynamic(
            self.source,
            output,
            per_channel=self.recipe.per_channel,
            weight_type=_ORT_TYPES[self.recipe.weight_type],
            nodes_to_exclude=exclude,
            # ONNX shape inference cannot type the outputs of ONNX Runtime's fused contrib ops
            # (Attention, SkipLayerNormalization): they are float tensors.
            extra_options={"WeightSymmetric": self.recipe.symmetric_weights, "DefaultTensorType": onnx.TensorProto.FLOAT},
        )

    def _write_nncf(self, keep_in_float: Sequence[str], output: Path) -> None:
        assert self.nncf is not None, "an NNCF recipe needs NNCF's model"
        # The base exclusions (the mask path) were NNCF's ignored scope; only the recipe's candidates come back to float.
        candidates = _quantizable(self.nncf.float_model, keep_in_float, self.recipe.candidate_op_types)
        onnx.save(returned_to_float(onnx.load(self.nncf.path), self.nncf.float_model, candidates), output)

    def _write_static(self, exclude: list[str], output: Path, reader: CalibrationDataReader | None) -> None:
        assert self.calibration is not None, "static quantization needs a calibration"
        quantize_static(
            self.source,
            output,
            calibration_data_reader=reader,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(self.recipe.candidate_op_types),
            per_channel=self.recipe.per_channel,
            activation_type=_ORT_TYPES[self.recipe.activation_type],
            weight_type=_ORT_TYPES[self.recipe.weight_type],
            nodes_to_exclude=exclude,
            calibrate_method=_ORT_CALIBRATION[self.calibration.method],
            calibration_cache_path=self.calibration.ranges_file,
            extra_options={
                "ActivationSymmetric": self.recipe.symmetric_activations,
                "WeightSymmetric": self.recipe.symmetric_weights,
                "CalibStridedMinMax": 1,
                "DefaultTensorType": onnx.TensorProto.FLOAT,
            },
        )


class _DropPreprocessingHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-process" not in record.getMessage()


@contextlib.contextmanager
def _quiet_quantization_tools() -> Iterator[None]:
    """Silence the noise of ORT's quantization tools, nothing else.

    ORT logs a pre-processing hint twice per call (dozens of lines in a search),
    numpy warns about overflow whenever a histogram meets the mask's float32-minimum
    sentinels, which the calibration fallback already handles and reports, and NNCF
    logs each step.
    """
    hint_filter = _DropPreprocessingHint()
    logging.root.addFilter(hint_filter)
    nncf_logger = logging.getLogger("nncf")
    nncf_level = nncf_logger.level
    nncf_logger.setLevel(logging.ERROR)
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            yield
    finally:
        logging.root.removeFilter(hint_filter)
        nncf_logger.setLevel(nncf_level)


# --------------------------------------------------------------------------- judging


@dataclasses.dataclass(frozen=True)
class Trial:
    """One candidate: which nodes the search returned to float, and how the model scored."""

    kept_in_float: tuple[str, ...]
    accuracy: float
    agreement: float
    seconds: float
    eligible: bool = True  # False: a revert-pass trial with more flips than its start, never chosen however it scores
    source: str = "plain"  # the float graph quantized: plain, or smoothed (edgekit.smoothing) with its alpha


@dataclasses.dataclass(frozen=True)
class Budget:
    """The target's budgets as the search applies them on validation, so that what it accepts passes on test.

    The search judges on validation and the evaluate pass gates on test, by the point estimate (at least
    ``min_agreement`` of the test rows agree). A candidate is accepted when, given its validation flips, the test
    gate would pass with probability ``SEARCH_CONFIDENCE``: the flip rate's posterior (Jeffreys, Beta(k + 1/2,
    n - k + 1/2)) predicts the test split's flips (beta-binomial), and the gate allows ``(1 - min_agreement) x
    test_rows`` of them. At 400 validation and 800 test rows that accepts no flip (the probability is 0.992; one
    flip gives 0.943); at 1,000 and 1,000 up to four. The Wilson bound at z = 1 used before accepted 2 flips in
    400 (0.837), and such models failed the test gate (bench/README.md, "Search").
    """

    float_accuracy: float
    max_drop_points: float
    min_agreement: float
    rows: int  # validation rows judged
    test_rows: int = 0  # rows the evaluate pass gates on (0: as many as validation)

    def drop_points(self, trial: Trial) -> float:
        return (self.float_accuracy - trial.accuracy) * 100

    def agreement_bound(self, trial: Trial) -> float:
        """The agreement's one-sided 95% Wilson lower bound on validation (reported)."""
        return measure.wilson_lower_bound(self.agreeing(trial), self.rows)

    def agreeing(self, trial: Trial) -> int:
        return round(trial.agreement * self.rows)

    def test_gate_probability(self, trial: Trial) -> float:
        """The predicted probability that this candidate meets ``min_agreement`` on the test split."""
        return measure.predicted_pass_probability(self.rows - self.agreeing(trial), self.rows, self.test_rows or self.rows,
                                                  self.min_agreement)

    def met_by(self, trial: Trial) -> bool:
        # No flips at all meets any agreement budget: a sample cannot show more (and a float fallback is the reference).
        agrees = trial.agreement == 1.0 or self.test_gate_probability(trial) >= SEARCH_CONFIDENCE
        return trial.eligible and self.drop_points(trial) <= self.max_drop_points and agrees

    def preference(self, trial: Trial) -> tuple:
        """Larger is better: within budget, the fewest float nodes; otherwise the best agreement, then accuracy."""
        if self.met_by(trial):
            return (1, -len(trial.kept_in_float), trial.agreement, trial.accuracy)
        return (0, trial.agreement, trial.accuracy, -len(trial.kept_in_float))


@dataclasses.dataclass(frozen=True)
class Judge:
    """Scores candidates on held-out rows against the float parent, with the target's engine on this host's CPU."""

    task: TaskSpec
    batches: list[dict[str, np.ndarray]]
    labels: np.ndarray
    float_logits: np.ndarray
    float_accuracy: float
    engine: str = "onnxruntime"

    @classmethod
    def for_float_model(cls, float_model: Path, input_names: Sequence[str], task: TaskSpec, rows: Split, scheme: str,
                        engine: str = "onnxruntime") -> Judge:
        batches = tokenized_batches(task, rows.inputs, input_names, rows_per_run(scheme))
        float_logits = _logits(float_model, batches, engine)
        accuracy = measure.classification_metrics(rows.labels, float_logits.argmax(-1), task.labels).accuracy
        return cls(task, batches, rows.labels, float_logits, accuracy, engine)

    def score(self, model: Path) -> tuple[float, float]:
        """Task accuracy and top-1 agreement with the float parent."""
        logits = _logits(model, self.batches, self.engine)
        accuracy = measure.classification_metrics(self.labels, logits.argmax(-1), self.task.labels).accuracy
        return accuracy, measure.fidelity(self.float_logits, logits).top1_agreement


def _logits(model: Path, batches: list[dict[str, np.ndarray]], engine: str = "onnxruntime") -> np.ndarray:
    from edgekit.engines import open_runner

    runner = open_runner(model, engine)
    return np.concatenate([runner.run(batch)[0] for batch in batches])


# --------------------------------------------------------------------------- sensitivity and search


def _rank_by_sensitivity(float_model: onnx.ModelProto, quantized: Path, nodes: Sequence[str], inputs: dict[str, np.ndarray]) -> list[tuple[str, float]]:
    """Quantized nodes, most damaging first, by the relative error each adds on its own.

    One probe run: the quantized model plus, for each node, a float twin fed the same
    (already perturbed) inputs before quantization. The gap between what the node's
    consumers see and the twin's output is the node's own error, not the error it
    inherits from upstream. Nodes the probe cannot see rank last.
    """
    probe, pairs = _probe_model(float_model, onnx.load(quantized), nodes)
    from edgekit.engines import OnnxRuntimeRunner

    session = OnnxRuntimeRunner(probe.SerializeToString()).session  # the probe's own outputs are named: the session itself
    feed = {value.name: inputs[value.name] for value in session.get_inputs()}
    wanted = sorted({name for _, seen, twin in pairs for name in (seen, twin)})
    values = dict(zip(wanted, session.run(wanted, feed), strict=True))
    errors = {node: _relative_error(values[twin], values[seen]) for node, seen, twin in pairs}
    ranked = sorted(errors.items(), key=lambda item: item[1], reverse=True)
    return ranked + [(node, float("nan")) for node in nodes if node not in errors]


def _probe_model(float_model: onnx.ModelProto, quantized: onnx.ModelProto, nodes: Sequence[str]) -> tuple[onnx.ModelProto, list[tuple[str, str, str]]]:
    """The quantized model with a float twin per node; returns (model, [(node, value its consumers see, twin output)])."""
    graph = quantized.graph
    float_nodes = {node.name: node for node in float_model.graph.node}
    float_weights = {init.name: init for init in float_model.graph.initializer}
    constants = FloatConstants(graph, float_weights)
    known = {init.name for init in graph.initializer} | {value.name for value in graph.input} | {out for node in graph.node for out in node.output}
    outputs = {value.name for value in graph.output}
    pairs = []
    for name in nodes:
        original = float_nodes[name]
        seen = _value_consumers_see(graph, original.output[0])
        missing = [value for value in original.input if value and value not in known and value not in float_weights]
        if seen is None or missing:
            continue
        twin = onnx.NodeProto()
        twin.CopyFrom(original)
        # The float weights, also where the quantized graph gives a name other values (ORT's QDQ names a dequantized bias so).
        twin.input[:] = [constants.name_for(value) if value in float_weights else value for value in original.input]
        twin.name = name + _TWIN_SUFFIX
        twin.output[:] = [value + _TWIN_SUFFIX for value in original.output]
        graph.node.append(twin)  # all its inputs already exist, so appending keeps the graph topologically sorted
        for value in (seen, twin.output[0]):
            if value not in outputs:
                graph.output.append(onnx.helper.make_tensor_value_info(value, onnx.TensorProto.FLOAT, None))
                outputs.add(value)
        pairs.append((name, seen, twin.output[0]))
    return quantized, pairs


def _value_consumers_see(graph: onnx.GraphProto, float_output: str) -> str | None:
    """A float node's output in the quantized graph as consumers see it: after its QuantizeLinear/DequantizeLinear pair, if any.

    Quantization keeps the float output's name (dynamic int8 rebuilds it from the
    integer result; QDQ keeps the node, or names the DequantizeLinear after a graph output).
    """
    if not any(float_output in node.output for node in graph.node):
        return None
    quantize = next((node for node in graph.node if node.op_type == "QuantizeLinear" and node.input[0] == float_output), None)
    dequantize = quantize and next((node for node in graph.node if node.op_type == "DequantizeLinear" and node.input[0] == quantize.output[0]), None)
    return dequantize.output[0] if dequantize else float_output


def _relative_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    """||candidate - reference|| / ||reference||, ignoring mask sentinels, which would swamp both norms."""
    reference, candidate = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
    ordinary = np.isfinite(reference) & (np.abs(reference) < _MASK_SENTINEL)
    scale = np.linalg.norm(reference[ordinary])
    return float(np.linalg.norm(candidate[ordinary] - reference[ordinary]) / max(scale, 1e-12))


class Search:
    """Candidates tried so far; the best one is always the file at ``output``."""

    def __init__(self, quantizer: Quantizer, judge: Judge, budget: Budget, output: Path) -> None:
        self.quantizer, self.judge, self.budget, self.output = quantizer, judge, budget, output
        self.scratch = output.with_name("candidate.onnx")
        self.trials: list[Trial] = []
        self.source = "plain"

    @property
    def best(self) -> Trial:
        return max(self.trials, key=self.budget.preference)

    def use(self, quantizer: Quantizer, source: str) -> None:
        """Quantize another float graph from now on (``source`` names it in the trials)."""
        self.quantizer, self.source = quantizer, source

    def try_keeping(self, nodes: Sequence[str], min_agreement: float = 0.0) -> Trial:
        """Quantize ``self.quantizer.source`` with ``nodes`` kept in float, score it, and keep the file if it is the best so
        far; a trial under ``min_agreement`` is recorded but never chosen."""
        started = time.perf_counter()
        self.quantizer.write(nodes, self.scratch)
        accuracy, agreement = self.judge.score(self.scratch)
        trial = Trial(tuple(nodes), accuracy, agreement, time.perf_counter() - started, eligible=agreement >= min_agreement,
                      source=self.source)
        if not self.trials or self.budget.preference(trial) > self.budget.preference(self.best):
            self.scratch.replace(self.output)
        self.trials.append(trial)
        return trial

    def discard_scratch(self) -> None:
        self.scratch.unlink(missing_ok=True)


def _return_sensitive_nodes_to_float(search: Search, ranking: Sequence[str], deadline: float, ctx: PassContext) -> None:
    """Keep the top-k sensitive nodes in float, doubling k until the budget holds, then bisect for the smallest k.

    At least one node stays quantized. The first step always runs, so the report
    shows a trade-off; later steps start only if one more, as long as the last,
    ends before ``deadline`` (a ``time.perf_counter()`` value).
    """
    most = len(ranking) - 1
    if most < 1:
        return
    task = ctx.progress.add_task("quantize: returning sensitive nodes to float", total=None)
    failing, passing = 0, None  # largest k known to break the budget, smallest known to meet it

    def step(k: int) -> bool:
        ctx.progress.advance(task)
        return search.budget.met_by(search.try_keeping(ranking[:k]))

    def time_left() -> bool:
        return time.perf_counter() + search.trials[-1].seconds <= deadline

    k = 1
    while passing is None:
        if step(k):
            passing = k
        else:
            failing = k
            if k == most or not time_left():
                return
            k = min(2 * k, most)
    while passing - failing > 1 and time_left():
        middle = (failing + passing) // 2
        if step(middle):
            passing = middle
        else:
            failing = middle


def _try_smoothing(search: Search, float_model: onnx.ModelProto, task: TaskSpec, ctx: PassContext) -> tuple[dict, onnx.ModelProto]:
    """All-int8 of SmoothQuant-ed versions of the float model (``edgekit.smoothing``), one per alpha, judged like any
    candidate. The best source stays the search's for the node search that follows; returns what was tried and the
    float graph of the chosen source."""
    from edgekit import smoothing

    rows = ctx.data.calibration.inputs[:SMOOTHING_ROWS]
    maxima = smoothing.input_channel_maxima(float_model, (model_feeds(task, rows[i:i + 1]) for i in range(len(rows))))
    plain = search.quantizer
    best = (plain, "plain", float_model, None)
    tried = []
    for alpha in SMOOTHING_ALPHAS:
        model = smoothing.smoothed(float_model, maxima, alpha)
        source = ctx.work_dir / SCRATCH_DIR / f"smoothed-{alpha}.onnx"
        source.parent.mkdir(exist_ok=True)
        onnx.save(model, source)
        search.use(dataclasses.replace(plain, source=source), f"smoothed, alpha {alpha}")
        trial = search.try_keeping(())
        tried.append({"alpha": alpha, "accuracy": trial.accuracy, "agreement": trial.agreement})
        if search.best is trial:
            best = (search.quantizer, search.source, model, alpha)
    quantizer, label, chosen, chosen_alpha = best
    search.use(quantizer, label)
    agreements = ", ".join(f"alpha {t['alpha']}: {t['agreement']:.4f}" for t in tried)
    verdict = f"alpha {chosen_alpha} chosen" if chosen_alpha else "no alpha beat the plain graph"
    ctx.say(f"quantize: SmoothQuant {verdict} (all-int8 validation agreement {agreements})")
    return {"alpha": chosen_alpha, "calibration_rows": len(rows), "tried": tried}, chosen


@dataclasses.dataclass(frozen=True)
class FloatCosts:
    """What keeping each node in float costs: the time its int8 form saves (``edgekit.node_latency``), or an estimate."""

    unit: Literal["ms measured on the build host", "weight elements (estimated)"]
    per_node: dict[str, float]
    measured_at: str  # the input the times were measured with


SIZE_COST_MS_PER_MB = 0.01  # a float megabyte's cost in the ranking: nodes whose int8 form saves no time still cost their size


def _float_costs(quantizer: Quantizer, float_model: onnx.ModelProto, candidates: Sequence[str], task: TaskSpec, ctx: PassContext) -> FloatCosts:
    """Dynamic int8: each candidate's measured gain (never below zero) plus its size at SIZE_COST_MS_PER_MB, at the
    first calibration row padded to max_length (the input the evaluate pass times). Static QDQ needs a calibration per
    node to be timed, so its cost is the node's weight elements."""
    if quantizer.recipe.scheme != "dynamic":
        return FloatCosts("weight elements (estimated)", {k: float(v) for k, v in _weight_elements(float_model).items()}, "-")
    from edgekit import node_latency

    feeds = model_feeds(task, ctx.data.calibration.inputs[:1], pad_to_max_length=True)
    ctx.say(f"quantize: timing {len(candidates)} nodes alone, float and int8, to learn what keeping each in float costs")
    gains = node_latency.quantization_gains(float_model, candidates, feeds,
                                            lambda source, output: dataclasses.replace(quantizer, source=source).write((), output),
                                            ctx.work_dir / SCRATCH_DIR / "node-timing")
    megabytes = {name: elements * 4 / 1e6 for name, elements in _weight_elements(float_model).items()}
    per_node = {name: round(max(gain, 0.0) + SIZE_COST_MS_PER_MB * megabytes.get(name, 0.0), 5) for name, gain in gains.items()}
    shape = "x".join(map(str, next(iter(feeds.values())).shape))
    return FloatCosts("ms measured on the build host", per_node, f"one row, inputs {shape}")


def _cheapest_fix_first(ranking: Sequence[tuple[str, float]], costs: dict[str, float]) -> list[str]:
    """Nodes in the order the search returns them to float: the most quantization error per unit of cost first.
    Nodes the probe could not see (error NaN) come last, cheapest first."""
    def key(item: tuple[str, float]) -> tuple:
        node, error = item
        cost = max(costs.get(node, 0.0), 1e-9)
        return (1, cost) if np.isnan(error) else (0, -error / cost)

    return [node for node, _ in sorted(ranking, key=key)]


def _weight_elements(model: onnx.ModelProto) -> dict[str, int]:
    """Each node's weight elements (its initializer inputs)."""
    sizes = {init.name: int(np.prod(init.dims)) for init in model.graph.initializer}
    return {node.name: sum(sizes.get(value, 0) for value in node.input) for node in model.graph.node}


def _requantize_costliest_first(search: Search, cost: dict[str, float], deadline: float, ctx: PassContext) -> None:
    """The revert pass: once a float set meets the budget, try quantizing each of its nodes again, costliest first (the
    most time saved), keeping each one quantized when validation shows no more flips than the starting set had.

    Accepting every change that merely still meets the budget overfits validation: dozens of greedy trials find the
    ones that happen to flip few validation rows (measured on the LoRA demo: 2 flips in 400 on validation, then 15 in
    800 on test). Stops at ``deadline``.
    """
    if not search.budget.met_by(search.best):
        return
    start = search.best
    kept = list(start.kept_in_float)
    task = ctx.progress.add_task("quantize: re-quantizing float nodes, costliest first", total=len(kept))
    for node in sorted(kept, key=lambda name: -cost.get(name, 0)):
        if time.perf_counter() + search.trials[-1].seconds > deadline:
            break
        fewer = [name for name in kept if name != node]
        if search.budget.met_by(search.try_keeping(fewer, min_agreement=start.agreement)):
            kept = fewer
        ctx.progress.advance(task)
    ctx.progress.remove_task(task)


# --------------------------------------------------------------------------- report


def _trial_record(trial: Trial, budget: Budget) -> dict:
    return {
        "kept_in_float_count": len(trial.kept_in_float),
        "accuracy": trial.accuracy,
        "accuracy_drop_points": budget.drop_points(trial),
        "agreement": trial.agreement,
        "agreement_lower_bound": round(budget.agreement_bound(trial), 5),
        "test_gate_probability": round(budget.test_gate_probability(trial), 4),
        "budget_met": budget.met_by(trial),
        "eligible": trial.eligible,
        "source": trial.source,
        "seconds": round(trial.seconds, 3),
    }


def _summary(recipe: Recipe, best: Trial, budget: Budget, kept_in_float: int) -> str:
    scores = f"top-1 agreement {best.agreement:.4f}, accuracy drop {budget.drop_points(best):.2f} points, {kept_in_float} node{'' if kept_in_float == 1 else 's'} kept in float"
    if budget.met_by(best):
        return f"quantize: {recipe.scheme} int8 within budget ({scores})"
    limits = f"needs agreement >= {budget.min_agreement} and drop <= {budget.max_drop_points}"
    return f"quantize: the best {recipe.scheme} int8 model found breaks the budget ({scores}; {limits}; float accuracy {budget.float_accuracy:.4f})"


def _report(
    recipe: Recipe,
    calibration: Calibration | None,
    judge: Judge,
    budget: Budget,
    search: Search,
    ranking: list[tuple[str, float]],
    kept_in_float: tuple[str, ...],
    candidates: list[str],
    started: float,
) -> dict:
    best = search.best
    return {
        "scheme": recipe.scheme,
        "requested_scheme": recipe.requested_scheme,
        "note": recipe.note,
        "calibration_method": calibration.method if calibration else None,
        "requested_calibration_method": recipe.calibration_method if calibration else None,
        "calibration_fallback": calibration.fallback if calibration else None,
        "calibration_rows": calibration.rows if calibration else (search.quantizer.nncf.rows if search.quantizer.nncf else 0),
        "quantizer": "nncf" if recipe.tool == "nncf" else "onnxruntime",
        "activation_type": recipe.activation_type,
        "weight_type": recipe.weight_type,
        "symmetric_activations": recipe.symmetric_activations,
        "symmetric_weights": recipe.symmetric_weights,
        "per_channel": recipe.per_channel,
        "op_types": list(recipe.candidate_op_types),
        "quantized_nodes": len(candidates) - len(best.kept_in_float),
        "evaluation_rows": len(judge.labels),
        "float_accuracy": judge.float_accuracy,
        "quantized_accuracy": best.accuracy,
        "accuracy_drop_points": budget.drop_points(best),
        "top1_agreement": best.agreement,
        "budget": {"max_accuracy_drop_points": budget.max_drop_points, "min_top1_agreement": budget.min_agreement},
        "budget_met": budget.met_by(best),
        "kept_in_float": list(kept_in_float),
        "sensitivity": [{"node": node, "relative_error": None if np.isnan(error) else error} for node, error in ranking],
        "trials": [_trial_record(trial, budget) for trial in search.trials],
        "seconds": round(time.perf_counter() - started, 3),
    }


PASS = Pass(
    name="quantize",
    takes=frozenset({Stage.OPTIMIZED}),
    gives=Stage.QUANTIZED,
    version=6,  # 2: the search's validation margin, SmoothQuant, the revert pass, the precision fallback; 3: dynamic int8 judged a row per run;
    # 4: nodes read by a comparison stay float, a graph with nothing to quantize stays fp32; 5: the predicted test gate as margin;
    # 6: NNCF for openvino targets; float twins and returned nodes read the float constants (renamed where quantization changed one)
    target_specific=True,
    libraries=("onnxruntime", "onnx", "nncf", "openvino"),
    options_for=options_for,
    run=run,
)
