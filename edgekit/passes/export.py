"""export: the Hugging Face model to ONNX, then onnx.checker and a parity check against PyTorch.

Optimum's exporter writes the graph with dynamic batch and sequence axes
(renamed ``batch`` and ``sequence``, the names target profiles use for shape
ranges). Parity: ONNX Runtime and PyTorch run the same validation texts; if any
output differs by more than the tolerance the build stops and names it, since
an export that "succeeds" with diverging outputs is the failure users meet most.
"""

from __future__ import annotations

import shutil

from pydantic import BaseModel, ConfigDict

from edgekit.artifact import Artifact, Pass, PassContext, Stage
from edgekit.config import BuildConfig
from edgekit.errors import EdgekitError
from edgekit.targets import TargetProfile, load_target

_DIM_NAMES = {"batch_size": "batch", "sequence_length": "sequence"}


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


def _rename_dims(model) -> None:
    for value in [*model.graph.input, *model.graph.output]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in _DIM_NAMES:
                dim.dim_param = _DIM_NAMES[dim.dim_param]


def run(artifact: Artifact, options: Options, ctx: PassContext) -> Artifact:
    if artifact.task.image is not None:
        _export_image_model(artifact, options, ctx)
    else:
        _export_text_model(artifact, options, ctx)
    parity = check_parity(artifact, ctx, options)
    return Artifact(Stage.ONNX, ctx.work_dir, "model.onnx", artifact.digest, artifact.task, metrics={**artifact.metrics, "export": parity})


def _export_image_model(artifact: Artifact, options: Options, ctx: PassContext) -> None:
    import onnx

    from edgekit.tasks import image_models

    model, record = image_models.load(artifact.directory)
    ctx.say(f"exporting to ONNX (opset {options.opset}) with torch.onnx")
    image_models.export_onnx(model, record, artifact.task.input_names[0], ctx.work_dir / "model.onnx", options.opset)
    onnx.checker.check_model(str(ctx.work_dir / "model.onnx"))


def _export_text_model(artifact: Artifact, options: Options, ctx: PassContext) -> None:
    import onnx
    from optimum.exporters.onnx import main_export

    staging = ctx.work_dir / "optimum"
    ctx.say(f"exporting to ONNX (opset {options.opset}) with optimum")
    try:
        main_export(str(artifact.directory), output=staging, task="text-classification", opset=options.opset,
                    device="cpu", do_validation=False)
    except (ValueError, KeyError, NotImplementedError) as exc:
        raise ExportError(f"optimum cannot export this model ({exc}); check that its architecture supports ONNX export") from None
    model = onnx.load(str(staging / "model.onnx"))
    _rename_dims(model)
    onnx.checker.check_model(model)
    onnx.save(model, str(ctx.work_dir / "model.onnx"))
    shutil.rmtree(staging)


def check_parity(artifact: Artifact, ctx: PassContext, options: Options) -> dict:
    """Largest |ONNX Runtime - PyTorch| over validation inputs; raise ExportError naming the output above tolerance."""
    import numpy as np
    import onnxruntime
    import torch

    from edgekit.tasks import model_feeds

    texts = ctx.data.val.inputs[: options.parity_samples]
    feeds = model_feeds(artifact.task, texts)
    if artifact.task.image is not None:
        from edgekit.tasks import image_models

        model = image_models.load(artifact.directory)[0]
        with torch.inference_mode():
            expected = model(torch.from_numpy(feeds[artifact.task.input_names[0]])).numpy()
    else:
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(artifact.directory).eval()
        with torch.inference_mode():
            expected = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
    session = onnxruntime.InferenceSession(str(ctx.work_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    (got,) = session.run(["logits"], {k: v for k, v in feeds.items() if k in wanted})
    error = float(np.max(np.abs(got - expected)))
    if error > options.parity_atol:
        raise ExportError(
            f"ONNX output 'logits' differs from PyTorch by up to {error:.3g} on {len(texts)} validation inputs "
            f"(tolerance {options.parity_atol:g}); the export is not faithful, so the build stops"
        )
    ctx.say(f"parity: ONNX Runtime matches PyTorch within {error:.2g} on {len(texts)} validation inputs")
    return {"parity_max_abs_error": error, "parity_samples": len(texts), "opset": options.opset}


PASS = Pass(
    name="export",
    version=1,
    takes=frozenset({Stage.TORCH}),
    gives=Stage.ONNX,
    target_specific=False,
    uses_data=True,
    libraries=("torch", "transformers", "optimum-onnx", "onnx", "onnxruntime"),
    options_for=options_for,
    run=run,
)
