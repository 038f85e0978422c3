"""optimize: graph optimisations for the target's runtime.

- ONNX Runtime targets: ONNX Runtime's transformer fusions (attention, LayerNorm,
  GELU, embedding). A fused Attention takes the attention mask as integers,
  which also keeps the float mask (-3.4e38) out of int8 calibration.
- TensorRT targets: only standard-op simplifications (TensorRT fuses by itself
  and cannot run ONNX Runtime's contrib ops).
- fp16 targets: weights to fp16, with fp32 inputs and outputs when the profile
  keeps I/O in fp32.
The optimised model must still agree with its input: the largest logit
difference on a few validation inputs is recorded, and a large one stops the build.
"""

from __future__ import annotations

import shutil

from pydantic import BaseModel, ConfigDict

from edgekit.artifact import Artifact, Pass, PassContext, Stage
from edgekit.config import BuildConfig
from edgekit.errors import EdgekitError
from edgekit.results import OptimizeResult
from edgekit.targets import TargetProfile

_AGREEMENT_ATOL = {"fp32": 1e-3, "fp16": 5e-2}


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    fusion: str | None  # ONNX Runtime transformer-fusion model type (the task's), or None
    fp16: bool
    keep_io_fp32: bool


def options_for(config: BuildConfig, target: TargetProfile | None) -> Options:
    from edgekit.tasks import task_for

    assert target is not None  # a target-specific pass
    return Options(
        # The fusions are ONNX Runtime contrib ops: TensorRT cannot run them (it fuses by itself).
        fusion=task_for(config.task.kind).graph_fusion if target.runtime.engine == "onnxruntime" else None,
        fp16=target.precision.preferred == "fp16",
        keep_io_fp32=target.precision.keep_io_fp32,
    )


def run(artifact: Artifact, options: Options, ctx: PassContext) -> Artifact:
    import onnx

    output = ctx.work_dir / "model.onnx"
    applied = []
    if options.fusion:
        from onnxruntime.transformers.optimizer import optimize_model

        optimizer = optimize_model(str(artifact.model_path), model_type=options.fusion, num_heads=0, hidden_size=0, opt_level=0)
        optimizer.save_model_to_file(str(output))
        applied.append(f"transformer fusions {optimizer.get_fused_operator_statistics()}")
    else:
        shutil.copy(artifact.model_path, output)
    if options.fp16:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = convert_float_to_float16(onnx.load(str(output)), keep_io_types=options.keep_io_fp32)
        onnx.save(model, str(output))
        applied.append("fp16 weights" + (" (fp32 inputs/outputs)" if options.keep_io_fp32 else ""))
    error = _max_difference(artifact, output, ctx)
    limit = _AGREEMENT_ATOL["fp16" if options.fp16 else "fp32"]
    if error > limit:
        raise EdgekitError(f"optimised model differs from its input by {error:.3g} (limit {limit:g}); rerun with a newer onnxruntime or report this")
    ctx.say(f"optimize: {'; '.join(applied) or 'no change for this runtime'} (max logit change {error:.2g})")
    precision = "fp16" if options.fp16 else artifact.precision
    results = artifact.recording(optimize=OptimizeResult(applied=applied, max_abs_change=error))
    # The reference for fidelity stays the model this one was trained from (quantization-aware training keeps the float one).
    return Artifact(Stage.OPTIMIZED, ctx.work_dir, "model.onnx", artifact.digest, artifact.task, precision=precision,
                    float_model=artifact.float_model, results=results)


def _max_difference(artifact: Artifact, optimized, ctx: PassContext) -> float:
    import numpy as np
    import onnxruntime

    from edgekit.tasks import model_feeds

    feeds = model_feeds(artifact.task, ctx.data.val.inputs[:8])
    results = []
    for path in (artifact.model_path, optimized):
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = {i.name for i in session.get_inputs()}
        results.append(session.run(None, {k: v for k, v in feeds.items() if k in names})[0].astype(np.float64))
    return float(np.max(np.abs(results[0] - results[1])))


PASS = Pass(
    name="optimize",
    takes=frozenset({Stage.ONNX}),
    gives=Stage.OPTIMIZED,
    target_specific=True,
    libraries=("onnx", "onnxruntime"),
    options_for=options_for,
    run=run,
)
