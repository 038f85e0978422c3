"""The compile pass: give the model what the target's runtime needs to build or load an engine.

ONNX Runtime and OpenVINO targets need nothing: the model passes through
unchanged (hard links, no copy); OpenVINO compiles the ONNX file when the device
loads it, in a second or two. TensorRT targets get :class:`EngineBuildOptions` (precision,
workspace, one optimisation profile from the target's dimension ranges) in
``engine_build``, which the bundle carries so the device builds its own engine
on first load: engines are tied to the GPU and the TensorRT version. Only where
this host's GPU and TensorRT match the target is the engine built here too, as
``model.plan``; otherwise the compile record's ``reason`` says why not.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from device_agent.host import HostReport, probe_host
from edgekit.artifact import Artifact, Pass, PassContext, Stage
from edgekit.errors import EdgekitError
from edgekit.results import CompileResult
from edgekit.targets import DimRange

if TYPE_CHECKING:
    from device_agent.tensorrt_engine import EngineBuildOptions
    from edgekit.config import BuildConfig
    from edgekit.targets import TargetProfile

# device_agent.tensorrt_engine (numpy) and onnx are imported where they are used,
# so that importing the pass list keeps `edgekit --help` instant.

PLAN_FILE = "model.plan"
_MIN_WORKSPACE_MB, _MAX_WORKSPACE_MB = 256, 4096


class Options(BaseModel):
    """What the compile pass needs from the target (the pipeline hashes these into the cache key)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target: str
    engine: Literal["onnxruntime", "tensorrt", "openvino"]
    dims: dict[str, DimRange] = Field(default={}, description="symbolic dimension ranges for the optimisation profile")
    workspace_mb: int = Field(gt=0)
    gpu_compute_capability: str | None = None
    tensorrt_version: str | None = Field(default=None, description="major.minor the target runs, from its software lock")


def workspace_mb(memory_budget_mb: int) -> int:
    """A quarter of the model's memory budget (the rest holds weights, activations and the agent), 256 MB to 4 GB."""
    return max(_MIN_WORKSPACE_MB, min(_MAX_WORKSPACE_MB, memory_budget_mb // 4))


def options_for(config: "BuildConfig", target: "TargetProfile | None") -> Options:
    if target is None:
        raise ValueError("the compile pass is target-specific; the pipeline must give it a target")
    return Options(
        target=target.name,
        engine=target.runtime.engine,
        dims=dict(target.input_shapes.dims) if target.input_shapes.mode == "profiles" else {},
        workspace_mb=workspace_mb(target.memory_budget_mb),
        gpu_compute_capability=target.gpu_compute_capability,
        tensorrt_version=target.software.tensorrt,
    )


# --------------------------------------------------------------------------- the model file


def _model_inputs_and_data(model_path: Path) -> tuple[dict[str, list[int | str]], list[str], int]:
    """The graph's real inputs (initializers excluded) with their shapes, its external data files, and its DequantizeLinear count."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    initializers = {tensor.name for tensor in model.graph.initializer}
    inputs: dict[str, list[int | str]] = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        if not value.type.tensor_type.HasField("shape"):
            raise EdgekitError(f"{model_path.name}: input {value.name!r} has no shape; export the model with input shapes")
        shape: list[int | str] = []
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.HasField("dim_value"):
                shape.append(int(dim.dim_value))
            elif dim.dim_param:
                shape.append(dim.dim_param)
            else:
                raise EdgekitError(
                    f"{model_path.name}: input {value.name!r} axis {axis} is dynamic without a name; "
                    "export with named dynamic axes (e.g. batch, sequence) so the target's ranges apply"
                )
        inputs[value.name] = shape
    external = sorted({
        entry.value
        for tensor in model.graph.initializer
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    })
    dequantize = sum(1 for node in model.graph.node if node.op_type == "DequantizeLinear")
    return inputs, external, dequantize


def _link(source: Path, destination: Path) -> None:
    """Hard-link (passes never modify their inputs), or copy across file systems."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.unlink(missing_ok=True)
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def _carry_model(artifact: Artifact, external: list[str], work_dir: Path) -> None:
    """Put the model file and its external data files into work_dir at the same relative paths."""
    model_dir = PurePosixPath(artifact.model_file).parent
    files = [artifact.model_file]
    for location in external:
        relative = PurePosixPath(location)
        if relative.is_absolute() or ".." in relative.parts:
            raise EdgekitError(f"{artifact.model_file}: external data location {location!r} leaves the model's folder")
        files.append(str(model_dir / relative))
    for name in files:
        source = artifact.directory / name
        if not source.is_file():
            raise EdgekitError(f"{artifact.model_file} needs {name}, which is not in {artifact.directory}")
        _link(source, work_dir / name)


# --------------------------------------------------------------------------- building here or not


def _major_minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def host_engine_problem(options: Options, host: HostReport) -> str | None:
    """Why this host must not build the target's engine (None when its GPU and TensorRT match the target).

    An engine only runs on the compute capability and TensorRT version it was
    built with, so the host builds one only when both match; every mismatch is
    named.
    """
    problems = []
    tensorrt = next((runtime for runtime in host.runtimes if runtime.name == "tensorrt"), None)
    host_tensorrt = tensorrt.version if tensorrt else None
    if not host.gpus:
        problems.append("host has no GPU")
    elif host.gpus[0].compute_capability != options.gpu_compute_capability:
        problems.append(f"host GPU {host.gpus[0].compute_capability or 'unknown'} != target {options.gpu_compute_capability}")
    if host_tensorrt is None:
        problems.append("tensorrt not installed")
    elif options.tensorrt_version and _major_minor(host_tensorrt) != _major_minor(options.tensorrt_version):
        problems.append(f"host TensorRT {host_tensorrt} != target {options.tensorrt_version}")
    return "; ".join(problems) or None


def _engine_options(artifact: Artifact, options: Options, inputs: dict[str, list[int | str]], dequantize: int) -> "EngineBuildOptions":
    from device_agent.tensorrt_engine import (
        EngineBuildError,
        EngineBuildOptions,
        profile_shapes,
    )

    if artifact.precision not in ("int8", "fp16", "fp32"):
        raise EdgekitError(f"precision {artifact.precision!r} cannot be built with TensorRT; allowed: int8, fp16, fp32")
    if artifact.precision == "int8" and dequantize == 0:
        raise EdgekitError(
            f"{artifact.model_file} is marked int8 but has no QuantizeLinear/DequantizeLinear nodes; TensorRT needs an "
            f"explicitly quantized (static QDQ) model: set quantization.scheme 'static_qdq' in target {options.target!r}"
        )
    try:
        profile = profile_shapes(inputs, options.dims)
    except EngineBuildError as exc:
        raise EdgekitError(
            f"target {options.target!r}: {exc}; add the dimension to input_shapes.dims (mode: profiles) in the target profile"
        ) from None
    return EngineBuildOptions(precision=artifact.precision, workspace_mb=options.workspace_mb, profile=profile)  # type: ignore[arg-type]


def run(artifact: Artifact, options: Options, ctx: PassContext) -> Artifact:
    work_dir = ctx.work_dir
    work_dir.mkdir(parents=True, exist_ok=True)
    inputs, external, dequantize = _model_inputs_and_data(artifact.model_path)
    _carry_model(artifact, external, work_dir)
    model_path = work_dir / artifact.model_file

    engine_build: dict[str, JsonValue] | None = None
    report: dict[str, JsonValue]
    if options.engine in ("onnxruntime", "openvino"):
        runtime = "ONNX Runtime" if options.engine == "onnxruntime" else "OpenVINO, which compiles it as the device loads it"
        report = {"engine": options.engine, "engine_built": False,
                  "reason": f"the target runs the ONNX model with {runtime}; there is no engine to build"}
    else:
        build_options = _engine_options(artifact, options, inputs, dequantize)
        engine_build = build_options.to_manifest()
        host = probe_host(work_dir)
        problem = host_engine_problem(options, host)
        report = {"engine": "tensorrt", "engine_built": False, "reason": problem}
        if problem:
            ctx.say(f"compile: not building the TensorRT engine here ({problem}); the device builds it on first load")
        else:
            from device_agent.tensorrt_engine import (
                EngineBuildError,
                build_engine_file,
                engine_cache_key,
                file_sha256,
            )

            ctx.say(f"compile: host matches target {options.target!r}: building the TensorRT engine here")
            try:
                seconds = build_engine_file(model_path, build_options, work_dir / PLAN_FILE)
            except EngineBuildError as exc:
                raise EdgekitError(f"target {options.target!r}: {exc}; the device would fail the same way") from None
            tensorrt_version = next(r.version for r in host.runtimes if r.name == "tensorrt")
            compute_capability = host.gpus[0].compute_capability
            report.update({
                "engine_built": True,
                "engine_file": PLAN_FILE,
                "engine_cache_key": engine_cache_key(file_sha256(model_path), str(tensorrt_version), str(compute_capability), build_options),
                "tensorrt_version": tensorrt_version,
                "compute_capability": compute_capability,
                "build_seconds": round(seconds, 3),
            })
    return replace(
        artifact,
        stage=Stage.ENGINE,
        directory=work_dir,
        engine_build=engine_build,
        results=artifact.recording(compile=CompileResult(**report)),
    )


PASS = Pass(
    name="compile",
    takes=frozenset({Stage.QUANTIZED}),
    gives=Stage.ENGINE,
    target_specific=True,
    uses_data=False,
    libraries=("onnx",),
    options_for=options_for,
    run=run,
)
