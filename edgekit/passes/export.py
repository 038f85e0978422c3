"""export: the torch-stage model to ONNX (the task's exporter), then a parity check against PyTorch.

Text models go through PyTorch's TorchScript exporter as loaded by the task
(mean-pooled or not; dynamic axes named ``batch`` and ``sequence``, the names
target profiles use for shape ranges); image models through torch.onnx too. Parity: ONNX Runtime and PyTorch run the same validation
inputs; if any output differs by more than the tolerance the build stops and
names it, since an export that "succeeds" with diverging outputs is the failure
users meet most.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from edgekit.artifact import Artifact, Pass, PassContext, Stage
from edgekit.config import BuildConfig
from edgekit.errors import EdgekitError
from edgekit.results import ExportResult
from edgekit.targets import TargetProfile, load_target


class ExportError(EdgekitError):
    """The model could not be exported faithfully."""


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    opset: int
    parity_atol: float
    parity_samples: int


def options_for(config: BuildConfig, target: TargetProfile | None) -> Options:
    opset = config.export.opset or min(load_target(name).opset for name in config.targets)
    return Options(opset=opset, parity_atol=config.export.parity_atol, parity_samples=config.export.parity_samples)


def run(artifact: Artifact, options: Options, ctx: PassContext) -> Artifact:
    from edgekit.tasks import task_for

    task_for(artifact.task.kind).export_onnx(artifact.directory, ctx.work_dir / "model.onnx", options.opset, ctx.say)
    parity = check_parity(artifact, ctx, options)
    return Artifact(Stage.ONNX, ctx.work_dir, "model.onnx", artifact.digest, artifact.task, trained_model=artifact.directory,
                    results=artifact.recording(export=parity))


def check_parity(artifact: Artifact, ctx: PassContext, options: Options) -> ExportResult:
    """Largest |ONNX Runtime - PyTorch| over validation inputs; raise ExportError naming the output above tolerance."""
    import numpy as np
    import onnxruntime
    import torch

    from edgekit.tasks import model_feeds, task_for

    task = task_for(artifact.task.kind)
    inputs = ctx.data.val.inputs[: options.parity_samples]
    feeds = model_feeds(artifact.task, inputs)
    model = task.load_torch(artifact.directory)
    with torch.inference_mode():
        expected = task.forward(model, {k: torch.from_numpy(v) for k, v in feeds.items()}).numpy()
    session = onnxruntime.InferenceSession(str(ctx.work_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    (got,) = session.run([artifact.task.output_name], {k: v for k, v in feeds.items() if k in wanted})
    error = float(np.max(np.abs(got - expected)))
    if error > options.parity_atol:
        raise ExportError(
            f"ONNX output {artifact.task.output_name!r} differs from PyTorch by up to {error:.3g} on {len(inputs)} validation inputs "
            f"(tolerance {options.parity_atol:g}); the export is not faithful, so the build stops"
        )
    ctx.say(f"parity: ONNX Runtime matches PyTorch within {error:.2g} on {len(inputs)} validation inputs")
    return ExportResult(parity_max_abs_error=error, parity_samples=len(inputs), opset=options.opset)


PASS = Pass(
    name="export",
    takes=frozenset({Stage.TORCH}),
    gives=Stage.ONNX,
    version=2,  # 2: records the PyTorch folder it exported (Artifact.trained_model), which the qat pass retrains
    libraries=("torch", "transformers", "onnx", "onnxruntime"),
    options_for=options_for,
    run=run,
)
