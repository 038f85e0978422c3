"""evaluate: measure the final model against its float reference and the target's budgets.

Runs on this host with the target's engine (ONNX Runtime's CPU provider, or
OpenVINO's CPU plugin for openvino targets; ONNX Runtime as the proxy for
TensorRT). When this host is not the target (another
CPU architecture, or a GPU target), the numbers are a labelled proxy: accuracy
and fidelity still hold, latency gates are not applied. Every number comes
from ``edgekit.measure``.
"""

from __future__ import annotations

import platform
from dataclasses import replace
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict

from device_agent.host import normalise_arch
from edgekit.artifact import Artifact, Pass, PassContext, Stage
from edgekit.passes.quantize import BATCH_ROWS, rows_per_run, tokenized_batches
from edgekit.results import EvaluationResult, Gate, ModelMetrics
from edgekit.config import BuildConfig
from edgekit.targets import Budgets, TargetProfile

if TYPE_CHECKING:
    import numpy as np


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    budgets: Budgets
    engine: str = "onnxruntime"
    max_batch: int
    host_is_target: bool
    latency_iterations: int
    throughput_seconds: float
    intra_op_threads: int | None


def host_is_target(target: TargetProfile) -> bool:
    """Whether latency measured here is the target's own: a CPU target of this host's architecture."""
    return target.accelerator == "cpu" and target.cpu_arch == normalise_arch(platform.machine())


def options_for(config: BuildConfig, target: TargetProfile | None) -> Options:
    assert target is not None
    return Options(
        budgets=target.budgets, engine=target.runtime.engine, max_batch=target.max_batch,
        host_is_target=host_is_target(target), latency_iterations=config.evaluation.latency_iterations,
        throughput_seconds=config.evaluation.throughput_seconds, intra_op_threads=target.runtime.intra_op_threads,
    )


def _session(path, options: Options):
    from edgekit.engines import open_runner

    return open_runner(path, options.engine, options.intra_op_threads)


def _logits(session, texts, task, rows_per_run: int, advance=lambda rows: None) -> "np.ndarray":
    """The model's logits for ``texts``, run ``rows_per_run`` rows at a time as the device would feed them."""
    import numpy as np

    outputs = []
    for feeds in tokenized_batches(task, texts, session.input_names, rows_per_run):
        outputs.append(session.run(feeds)[0])
        advance(len(outputs[-1]))
    return np.concatenate(outputs)


def measure_model(path, texts, labels, task, options: Options, ctx: PassContext, what: str,
                  rows_per_run: int = BATCH_ROWS) -> tuple[ModelMetrics, "np.ndarray"]:
    """Task metrics, latency and throughput of one ONNX model on this host as the target's engine runs it; the logits come
    from runs of ``rows_per_run``."""
    from edgekit.measure import classification_metrics, latency, size_mb, throughput
    from edgekit.tasks import model_feeds, task_for

    session = _session(path, options)
    progress = ctx.progress.add_task(f"evaluating {what}", total=len(texts))
    logits = _logits(session, texts, task, rows_per_run, lambda rows: ctx.progress.advance(progress, rows))
    ctx.progress.remove_task(progress)
    scores = classification_metrics(labels, logits.argmax(-1), task.labels)
    names = set(session.input_names)
    # Texts padded to max_length: timing then does not depend on which texts happen to come first.
    one = {k: v for k, v in model_feeds(task, texts[:1], pad_to_max_length=True).items() if k in names}
    batch = {k: v for k, v in model_feeds(task, texts[: options.max_batch], pad_to_max_length=True).items() if k in names}
    rows = len(texts[: options.max_batch])
    timing = latency(lambda: session.run(one), iterations=options.latency_iterations)
    rate = throughput(lambda: session.run(batch), rows, seconds=options.throughput_seconds)
    pr_auc, positive = _positive_class_pr_auc(labels, logits, task.labels)
    metrics = ModelMetrics(
        accuracy=scores.accuracy, f1_macro=scores.f1_macro, precision_macro=scores.precision_macro,
        recall_macro=scores.recall_macro, per_class=scores.per_class, confusion=scores.confusion,
        latency_p50_ms=timing.p50_ms, latency_p95_ms=timing.p95_ms, throughput=rate,
        throughput_batch=rows, size_mb=size_mb(path), pr_auc=pr_auc, pr_auc_label=positive, rows_per_run=rows_per_run,
        **task_for(task.kind).input_shape(task),
    )
    return metrics, logits


def _positive_class_pr_auc(labels, logits, names: tuple[str, ...]) -> tuple[float | None, str | None]:
    """Binary tasks: ``measure.rare_class_pr_auc`` of the softmax probabilities; (None, None) otherwise."""
    import numpy as np

    from edgekit.measure import rare_class_pr_auc

    if logits.shape[-1] != 2:
        return None, None
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return rare_class_pr_auc(labels, np.exp(shifted) / np.exp(shifted).sum(axis=-1, keepdims=True), names)


def gates(reference: ModelMetrics, final: ModelMetrics, options: Options) -> tuple[Gate, ...]:
    """The target's budgets as pass/fail rows."""
    budgets = options.budgets
    drop = (reference.accuracy - final.accuracy) * 100
    rows = [
        Gate(name="accuracy drop (points)", value=round(drop, 3), budget=budgets.max_accuracy_drop_points,
             passed=drop <= budgets.max_accuracy_drop_points),
        Gate(name="top-1 agreement with fp32", value=round(final.top1_agreement, 4), budget=budgets.min_top1_agreement,
             passed=final.top1_agreement >= budgets.min_top1_agreement),
        # The gate is the point estimate on test; its 95% lower bound and flip count say how much that number can be trusted.
        Gate(name=f"top-1 agreement, 95% lower bound ({final.flips} flips in {sum(map(sum, final.confusion))} rows; informational)",
             value=round(final.top1_agreement_lower_95, 4), budget=None, passed=True),
    ]
    if final.batched_top1_agreement is not None:
        # Dynamic int8 ranges span a run's rows: a server that batches requests gives this agreement instead.
        rows.append(Gate(name=f"top-1 agreement in padded batches of {BATCH_ROWS} (dynamic int8; informational)",
                         value=round(final.batched_top1_agreement, 4), budget=None, passed=True))
    if budgets.max_model_size_mb is not None:
        rows.append(Gate(name="model size (MB)", value=round(final.size_mb, 2), budget=budgets.max_model_size_mb,
                         passed=final.size_mb <= budgets.max_model_size_mb))
    if budgets.p95_latency_ms is not None and options.host_is_target:
        rows.append(Gate(name="p95 latency at batch 1 (ms)", value=round(final.latency_p95_ms, 3), budget=budgets.p95_latency_ms,
                         passed=final.latency_p95_ms <= budgets.p95_latency_ms))
    # The build process's peak memory says little about the device's: shown, never gated.
    rows.append(Gate(name="peak memory of the build process (MB, informational)", value=round(final.peak_rss_mb, 1),
                     budget=None, passed=True))
    return tuple(rows)


def run(artifact: Artifact, options: Options, ctx: PassContext) -> Artifact:
    from edgekit.engines import runtime_label
    from edgekit.measure import fidelity, peak_rss_mb

    test = ctx.data.test
    reference_path = artifact.float_model or artifact.model_path
    quantization = artifact.results.quantization
    scheme = quantization.scheme if quantization and artifact.precision == "int8" else "none"
    rows = rows_per_run(scheme)
    reference, reference_logits = measure_model(reference_path, test.inputs, test.labels, artifact.task, options, ctx, "fp32 reference", rows)
    final, final_logits = measure_model(artifact.model_path, test.inputs, test.labels, artifact.task, options, ctx,
                                        f"{artifact.precision} model", rows)
    measured = {**fidelity(reference_logits, final_logits).to_dict(), "peak_rss_mb": peak_rss_mb()}
    if rows == 1:
        batched = _logits(_session(artifact.model_path, options), test.inputs, artifact.task, BATCH_ROWS)
        measured["batched_top1_agreement"] = fidelity(reference_logits, batched).top1_agreement
    final = final.model_copy(update=measured)
    evaluation = EvaluationResult(runtime=runtime_label(options.engine), proxy=not options.host_is_target, test_rows=len(test),
                                  reference=reference, final=final)
    # The model files stay where the compile pass wrote them: evaluation adds numbers, not files.
    return replace(artifact, stage=Stage.EVALUATED, results=artifact.recording(evaluation=evaluation),
                   gates=gates(reference, final, options))


PASS = Pass(
    name="evaluate",
    takes=frozenset({Stage.ENGINE}),
    gives=Stage.EVALUATED,
    version=3,  # 2: flips and the agreement's lower bound; 3: dynamic int8 scored one row per run
    target_specific=True,
    libraries=("onnxruntime", "openvino"),
    options_for=options_for,
    run=run,
    remeasures_failures=True,
)
