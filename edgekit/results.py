"""What each pass measured, as typed records: the artifact carries them, the report is assembled from them.

A pass returns its record in ``Artifact.results`` (one optional field per pass)
and, for the evaluate pass, the gates in ``Artifact.gates``: the pipeline's
control flow (write a bundle or not, measure a cached failure again) reads the
gates, never a string key. Field names are the keys of ``report.json``, so the
report is these records dumped as JSON. Records reject unknown fields: a pass
that reports something new declares it here.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, JsonValue


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Gate(_Record):
    """One of the target's budgets, judged: the build writes a bundle only when every gate passed."""

    name: str
    value: float | None
    budget: float | None
    passed: bool


class _TrainingRun(_Record):
    """The numbers of one run of the training loop (``edgekit.training.fit``), where a pass reports them."""

    device: str | None = None
    val_accuracy: float | None = None
    val_accuracy_before: float | None = None  # the starting weights' score, when they competed
    best_epoch: int | None = None
    epochs_run: int | None = None
    seconds: float | None = None
    samples_per_second: float | None = None
    loss_curve: list[float] | None = None
    kept: str | None = None


class LoadResult(_TrainingRun):
    """Text: the head fitted on frozen features. Images: the model built and trained from scratch."""

    head: str | None = None
    pooling: str | None = None  # text: cls or mean
    val_f1_macro: float | None = None
    epochs: int | None = None
    model: str | None = None
    parameters: int | None = None
    widths: list[int] | None = None


class FinetuneResult(_TrainingRun):
    """The fine-tuned model beside the one it started from, on validation (test is the evaluate pass's alone)."""

    method: str
    val_accuracy_head_only: float | None = None
    resumed_after_epoch: int | None = None


class BeforeAfter(_Record):
    before: float
    after: float


class PruneResult(_Record):
    """What left the model, what it cost in validation accuracy and what it bought in size and latency."""

    architecture: str
    goal: str
    ratio: float
    importance: str
    calibration_rows: int
    parameters: dict[str, int]
    size_mb: BeforeAfter
    latency_p50_ms: BeforeAfter
    latency_p95_ms: BeforeAfter
    speedup: float
    latency_note: str
    val_accuracy: dict[str, float | None]
    recovery: dict[str, JsonValue] | None
    seconds: float
    # encoders
    heads_before: list[int] | None = None
    heads_after: list[int] | None = None
    heads_removed_per_layer: list[int] | None = None
    pruned_heads: dict[str, list[int]] | None = None
    neurons_before: list[int] | None = None
    neurons_after: list[int] | None = None
    neurons_removed_per_layer: list[int] | None = None
    kept: str | None = None
    search: list[dict[str, JsonValue]] | None = None
    # CNNs
    channels_before: list[int] | None = None
    channels_after: list[int] | None = None


class ExportResult(_Record):
    parity_max_abs_error: float
    parity_samples: int
    opset: int


class OptimizeResult(_Record):
    applied: list[str]
    max_abs_change: float


class QatResult(_Record):
    """Quantization-aware training: the int8-emulating model's agreement with the float model before and after."""

    scheme: str
    train_rows: int
    epochs_run: int
    best_epoch: int  # 0: the starting weights were kept
    kept: str
    val_agreement_before: float
    val_agreement_after: float
    val_kl_before: float
    val_kl_after: float
    val_float_agreement_after: float  # the trained model without fake quantization: the ceiling of quantize's float fallback
    device: str
    seconds: float
    parity_max_abs_error: float


class QuantizeResult(_Record):
    """The recipe ORT (or NNCF) ran, the search for nodes to keep in float, and how the best model compares with its float
    parent."""

    scheme: str
    precision: str | None = None  # scheme none: the float precision kept
    quantizer: str | None = None  # what wrote the int8 model: onnxruntime, or nncf for OpenVINO targets
    requested_scheme: str | None = None
    note: str | None = None
    calibration_method: str | None = None
    requested_calibration_method: str | None = None
    calibration_fallback: str | None = None
    calibration_rows: int = 0
    activation_type: str | None = None
    weight_type: str | None = None
    symmetric_activations: bool | None = None
    symmetric_weights: bool | None = None
    per_channel: bool | None = None
    op_types: list[str] = []
    quantized_nodes: int | None = None
    evaluation_rows: int | None = None
    float_accuracy: float | None = None
    quantized_accuracy: float | None = None
    accuracy_drop_points: float | None = None
    top1_agreement: float | None = None
    budget: dict[str, float] | None = None
    budget_met: bool | None = None
    kept_in_float: list[str] = []
    sensitivity: list[dict[str, JsonValue]] = []
    trials: list[dict[str, JsonValue]] = []
    # dynamic int8 missed the budget: SmoothQuant tried, {alpha (chosen, or None), calibration_rows, tried: [{alpha, ...}]}
    smoothing: dict[str, JsonValue] | None = None
    # the node search ran: what keeping each candidate in float costs {unit, per_node: {node: cost}, measured_at}
    float_costs: dict[str, JsonValue] | None = None
    # int8 broke the budget and the target lists fallback precisions: {used, precision, tried: [{precision, accuracy, ...}]}
    precision_fallback: dict[str, JsonValue] | None = None
    seconds: float | None = None


class CompileResult(_Record):
    engine: str
    engine_built: bool
    reason: str | None = None
    engine_file: str | None = None
    engine_cache_key: str | None = None
    tensorrt_version: str | None = None
    compute_capability: str | None = None
    build_seconds: float | None = None


class ModelMetrics(_Record):
    """Task metrics, latency, throughput and size of one ONNX model on the build host (``edgekit.measure``)."""

    accuracy: float
    f1_macro: float
    precision_macro: float
    recall_macro: float
    per_class: dict[str, dict[str, float | int]]  # precision, recall, f1; support is a count
    confusion: list[list[int]]
    latency_p50_ms: float
    latency_p95_ms: float
    throughput: float
    throughput_batch: int
    size_mb: float
    pr_auc: float | None = None  # binary tasks: average precision of the rarer class in the test rows (pr_auc_label)
    pr_auc_label: str | None = None
    sequence_length: int | None = None  # text
    image_size: list[int] | None = None  # images
    # the final model only: fidelity to its float reference, and the build's peak memory
    top1_agreement: float | None = None
    top1_agreement_lower_95: float | None = None  # one-sided 95% Wilson lower bound
    flips: int | None = None  # test rows whose top-1 class differs from the fp32 reference's
    rows_per_run: int | None = None  # test rows per model run: 1 under dynamic int8 (edgekit.passes.quantize.rows_per_run)
    # dynamic int8 only: the agreement when the test rows run in padded batches, as a batching server may run them
    batched_top1_agreement: float | None = None
    max_abs_error: float | None = None
    mean_abs_error: float | None = None
    peak_rss_mb: float | None = None


class EvaluationResult(_Record):
    runtime: str
    proxy: bool = Field(description="the build host is not the target: latency is a labelled proxy and not gated")
    test_rows: int
    reference: ModelMetrics
    final: ModelMetrics


class PassResults(_Record):
    """Every record a build's passes have written so far, one field per pass."""

    load: LoadResult | None = None
    finetune: FinetuneResult | None = None
    prune: PruneResult | None = None
    export: ExportResult | None = None
    qat: QatResult | None = None
    optimize: OptimizeResult | None = None
    quantization: QuantizeResult | None = None
    compile: CompileResult | None = None
    evaluation: EvaluationResult | None = None
