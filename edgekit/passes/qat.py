"""qat: train the model through its target's int8 numerics, distilled from its own float logits, then export it again.

Runs per target, between export and optimize, when the target quantizes
dynamically to int8 and the task's models can be trained for it (see
``edgekit.fake_quant``; text models today). The float model the export pass wrote
stays the reference every later judgement uses (the quantize search, the
evaluate pass's agreement and accuracy gates), so a QAT model is judged against
the customized model, not against itself.

The phase: the PyTorch model runs under :func:`edgekit.fake_quant.dynamic_int8`
(what ONNX Runtime's int8 kernels will compute) and learns, in the one training
loop, to reproduce the float model's logits on training rows (KL divergence at
``qat.temperature``; no labels, so it cannot drift from what the float model
learned). After each epoch the int8-emulating model is scored on validation by
its top-1 agreement with the float model (mean KL breaks ties); the starting
weights compete, so a phase that does not improve agreement is discarded and the
report says so. The trained weights are exported and checked for parity with
PyTorch like any export.
"""

from __future__ import annotations

import time

import numpy as np
from pydantic import BaseModel, ConfigDict

from edgekit.artifact import Artifact, Pass, PassContext, Stage
from edgekit.config import BuildConfig, QatSection
from edgekit.data import Split
from edgekit.passes import export
from edgekit.results import QatResult
from edgekit.targets import TargetProfile

SCHEME = "dynamic"  # the int8 recipe edgekit.fake_quant emulates
_KL_TIE_BREAK = 1e-3  # weight of the mean KL in the validation score: far below one flip in any validation set


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    qat: QatSection
    export: export.Options


def options_for(config: BuildConfig, target: TargetProfile | None) -> Options:
    return Options(qat=config.qat, export=export.options_for(config, target))


def applies(config: BuildConfig, target: TargetProfile, trained_here: bool) -> bool:
    """Whether the build runs QAT for ``target``: an int8 target with the scheme it emulates, a model trained here."""
    from edgekit.tasks import task_for

    if not config.qat.enabled or not trained_here:
        return False
    int8 = target.precision.preferred == "int8" and target.quantization.scheme == SCHEME
    return int8 and SCHEME in task_for(config.task.kind).quantization_aware_schemes


def run(artifact: Artifact, options: Options, ctx: PassContext) -> Artifact:
    """Train ``artifact.trained_model`` under fake quantization, export it to ``ctx.work_dir``; the input stays the reference."""
    import torch

    from edgekit import fake_quant, training
    from edgekit.checkpoints import Checkpoints
    from edgekit.tasks import task_for

    if artifact.trained_model is None:
        raise RuntimeError("qat needs the PyTorch model the ONNX model was exported from (the export pass records it)")
    settings, task, spec = options.qat, task_for(artifact.task.kind), artifact.task
    torch.manual_seed(settings.seed)
    model = task.load_torch(artifact.trained_model)
    train = ctx.data.train.head(settings.max_train_rows) if settings.max_train_rows else ctx.data.train
    teacher = {"train": _logits(task, spec, model, train), "val": _logits(task, spec, model, ctx.data.val)}
    scores = _AgreementWithFloat(task, spec, ctx.data.val, teacher["val"])
    batches = training.Shuffled(len(train), settings.batch_size, settings.seed,
                                lambda rows, _epoch: _batch(task, spec, train, rows, teacher["train"]))
    fit_settings = training.FitSettings(settings.epochs, settings.learning_rate, 0.0, "linear",
                                        warmup_steps=batches.steps_per_epoch // 10, label="qat (int8-aware distillation)",
                                        score_name="int8-emulated agreement on validation", bf16_autocast=False,
                                        train_mode=False)  # deterministic: the student learns the teacher's exact logits
    started = time.perf_counter()
    with fake_quant.dynamic_int8(model):
        result = training.fit(model, batches, training.distillation(task.forward, settings.temperature, label_weight=0.0),
                              fit_settings, progress=ctx.progress, say=ctx.say, validate=scores.score, initial=scores.initial,
                              checkpoints=Checkpoints(ctx.checkpoint_dir))
        after = scores.measure(model.to(result.device))
    # Unquantized, the trained model is no longer the float model: what quantize's float fallback can reach at most.
    float_after = scores.measure(model)
    model.to("cpu")
    trained = ctx.work_dir / "torch"
    task.save_torch(model, artifact.trained_model, trained)
    torch_artifact = Artifact(Stage.TORCH, trained, ".", artifact.digest, spec)
    task.export_onnx(trained, ctx.work_dir / "model.onnx", options.export.opset, ctx.say)
    parity = export.check_parity(torch_artifact, ctx, options.export)
    before = result.extra["before"]
    record = QatResult(scheme=SCHEME, train_rows=len(train), epochs_run=result.epochs_run, best_epoch=result.best_epoch,
                       kept="trained" if result.improved else "the starting weights (QAT did not improve agreement on validation)",
                       val_agreement_before=before["agreement"], val_agreement_after=after["agreement"],
                       val_kl_before=before["kl"], val_kl_after=after["kl"], val_float_agreement_after=float_after["agreement"],
                       device=result.device,
                       seconds=round(time.perf_counter() - started, 3), parity_max_abs_error=parity.parity_max_abs_error)
    ctx.say(f"qat: int8-emulated agreement with the float model on validation {before['agreement']:.4f} -> {after['agreement']:.4f} "
            f"(mean KL {before['kl']:.4g} -> {after['kl']:.4g}); {record.kept}")
    return Artifact(Stage.ONNX, ctx.work_dir, "model.onnx", artifact.digest, spec, float_model=artifact.model_path,
                    trained_model=trained, results=artifact.recording(qat=record))


def _logits(task, spec, model, split: Split) -> np.ndarray:
    from edgekit import training

    return training.predict(model, task.torch_batches(spec, split), task.forward, bf16_autocast=False)  # exact emulation


def _rows(split: Split, rows: np.ndarray) -> Split:
    inputs = tuple(split.inputs[i] for i in rows) if isinstance(split.inputs, tuple) else split.inputs[rows]
    return Split(inputs, split.labels[rows])


def _batch(task, spec, split: Split, rows: np.ndarray, teacher: np.ndarray):
    import torch

    from edgekit import training

    (inputs,) = task.torch_batches(spec, _rows(split, rows), len(rows))
    return training.Batch(inputs, torch.from_numpy(split.labels[rows]), torch.from_numpy(teacher[rows]))


class _AgreementWithFloat:
    """How closely the (int8-emulating) model follows the float model on validation: top-1 agreement, mean KL."""

    def __init__(self, task, spec, split: Split, teacher: np.ndarray) -> None:
        self.task, self.spec, self.split, self.teacher = task, spec, split, teacher

    def measure(self, model) -> dict:
        logits = _logits(self.task, self.spec, model, self.split)
        agreement = float(np.mean(logits.argmax(-1) == self.teacher.argmax(-1)))
        return {"agreement": agreement, "kl": _mean_kl(self.teacher, logits)}

    def score(self, model) -> float:
        measured = self.measure(model)
        return measured["agreement"] - _KL_TIE_BREAK * measured["kl"]

    def initial(self, model) -> tuple[float, dict]:
        measured = self.measure(model)
        return measured["agreement"] - _KL_TIE_BREAK * measured["kl"], {"before": measured}


def _mean_kl(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Mean KL(softmax(reference) || softmax(candidate)) over rows."""

    def log_softmax(logits: np.ndarray) -> np.ndarray:
        shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))

    p_log, q_log = log_softmax(reference), log_softmax(candidate)
    return float(np.mean(np.sum(np.exp(p_log) * (p_log - q_log), axis=-1)))


PASS = Pass(
    name="qat",
    takes=frozenset({Stage.ONNX}),
    gives=Stage.ONNX,
    target_specific=True,
    libraries=("torch", "transformers", "onnx", "onnxruntime"),
    options_for=options_for,
    run=run,
)
