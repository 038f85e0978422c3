"""Target profiles: what a build is for, as validated data.

A profile (YAML, validated by :class:`TargetProfile`) names the device class,
its software lock, the runtime and precision to build for, and the budgets the
build must meet. The built-in profiles live in the repository's ``targets/``
folder and ship inside the wheel as ``edgekit.builtin_targets``; a user's own
YAML file works wherever a built-in name does.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgekit.errors import UnknownTargetError
from device_agent.validation import load_yaml_model

Precision = Literal["int8", "fp16", "fp32"]
ExecutionProvider = Literal["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
_GPU_PROVIDERS = {"TensorrtExecutionProvider", "CUDAExecutionProvider"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SoftwareLock(_Strict):
    """The versions installed on the device class (from the vendors' release notes)."""

    os: str | None = None
    jetpack: str | None = None
    l4t: str | None = None
    cuda: str | None = None
    cudnn: str | None = None
    tensorrt: str | None = None
    onnxruntime: str | None = None
    openvino: str | None = None

    def pinned(self) -> dict[str, str]:
        """Only the versions this profile pins."""
        return {key: value for key, value in self.model_dump().items() if value is not None}


class RuntimeSpec(_Strict):
    engine: Literal["onnxruntime", "tensorrt", "openvino"]
    execution_providers: list[ExecutionProvider] = Field(
        min_length=1, description="ONNX Runtime's, in order of preference (for an openvino engine: where OpenVINO is missing)")
    intra_op_threads: int | None = Field(default=None, ge=1, description="None lets the runtime decide")


class PrecisionPolicy(_Strict):
    preferred: Precision
    fallback: list[Precision] = Field(default=[], description="tried in order when the preferred precision breaks a budget")
    keep_io_fp32: bool = Field(default=True, description="keep model inputs and outputs fp32 when converting to fp16")

    @model_validator(mode="after")
    def _distinct(self) -> "PrecisionPolicy":
        chain = [self.preferred, *self.fallback]
        if len(set(chain)) != len(chain):
            raise ValueError(f"precision chain {chain} repeats a precision")
        return self


class QuantizationSpec(_Strict):
    scheme: Literal["none", "dynamic", "static_qdq"]
    weight_type: Literal["int8", "uint8"] = "int8"
    activation_type: Literal["int8", "uint8"] = "uint8"
    symmetric_weights: bool = True
    symmetric_activations: bool = False
    per_channel: bool = True
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    calibration_samples: int = Field(default=256, ge=1)


class DimRange(_Strict):
    """One symbolic dimension's range for a TensorRT optimisation profile."""

    min: int = Field(ge=1)
    opt: int = Field(ge=1)
    max: int = Field(ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> "DimRange":
        if not self.min <= self.opt <= self.max:
            raise ValueError(f"needs min <= opt <= max, got {self.min}, {self.opt}, {self.max}")
        return self


class ShapePolicy(_Strict):
    """How input shapes are fixed: fully dynamic, or ranges per symbolic dimension (``batch``, ``sequence``, ...)."""

    mode: Literal["dynamic", "profiles"]
    dims: dict[str, DimRange] = {}

    @model_validator(mode="after")
    def _dims_for_profiles(self) -> "ShapePolicy":
        if self.mode == "profiles" and not self.dims:
            raise ValueError("mode 'profiles' needs dims, e.g. {batch: {min: 1, opt: 1, max: 8}}")
        return self


class Budgets(_Strict):
    max_accuracy_drop_points: float = Field(ge=0, description="task accuracy lost against fp32, in percentage points")
    min_top1_agreement: float = Field(default=0.99, ge=0, le=1)
    p95_latency_ms: float | None = Field(default=None, gt=0, description="batch 1, measured on the target")
    max_model_size_mb: float | None = Field(default=None, gt=0)


class TargetProfile(_Strict):
    """A device class to build for: hardware, software lock, runtime, precision and budgets."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")
    description: str = Field(min_length=1)
    cpu_arch: Literal["x86_64", "aarch64"]
    accelerator: Literal["cpu", "cuda"]
    gpu_compute_capability: str | None = Field(default=None, pattern=r"^[0-9]+\.[0-9]+$")
    software: SoftwareLock = SoftwareLock()
    memory_budget_mb: int = Field(gt=0, description="memory the model may use on the device")
    runtime: RuntimeSpec
    precision: PrecisionPolicy
    quantization: QuantizationSpec
    opset: int = Field(ge=13, le=23)
    input_shapes: ShapePolicy
    max_batch: int = Field(ge=1)
    max_batch_delay_ms: float = Field(default=2.0, ge=0, description="how long the device's batcher waits to fill a batch")
    budgets: Budgets

    @model_validator(mode="after")
    def _consistent(self) -> "TargetProfile":
        gpu_providers = _GPU_PROVIDERS.intersection(self.runtime.execution_providers)
        if self.accelerator == "cuda" and self.gpu_compute_capability is None:
            raise ValueError("accelerator 'cuda' needs gpu_compute_capability (e.g. '8.7' for Jetson Orin)")
        if self.accelerator == "cpu":
            if self.gpu_compute_capability is not None:
                raise ValueError("gpu_compute_capability is set, but accelerator is 'cpu'")
            if gpu_providers or self.runtime.engine == "tensorrt":
                raise ValueError(f"accelerator 'cpu' cannot use {sorted(gpu_providers) or 'the tensorrt engine'}")
        if self.precision.preferred == "int8" and self.quantization.scheme == "none":
            raise ValueError("precision int8 needs quantization.scheme 'dynamic' or 'static_qdq'")
        if self.precision.preferred != "int8" and self.quantization.scheme != "none":
            raise ValueError(f"quantization.scheme {self.quantization.scheme!r} needs precision.preferred 'int8'")
        if self.runtime.engine == "openvino":
            if self.accelerator != "cpu" or self.cpu_arch != "x86_64":
                raise ValueError("the openvino engine runs on x86_64 CPUs: set accelerator 'cpu' and cpu_arch 'x86_64'")
            if self.quantization.scheme == "dynamic":
                raise ValueError("the openvino engine runs static int8 (NNCF's QDQ model): use quantization.scheme 'static_qdq'")
            spec = self.quantization
            if spec.scheme == "static_qdq" and (spec.weight_type, spec.symmetric_weights, spec.per_channel, spec.activation_type,
                                                 spec.symmetric_activations) != ("int8", True, True, "uint8", False):
                raise ValueError("the openvino engine quantizes with NNCF's transformer preset: set weight_type 'int8', "
                                 "symmetric_weights true, per_channel true, activation_type 'uint8', symmetric_activations false")
        uses_tensorrt = self.runtime.engine == "tensorrt" or "TensorrtExecutionProvider" in gpu_providers
        if uses_tensorrt and self.quantization.scheme == "dynamic":
            raise ValueError("TensorRT cannot run dynamic quantization; use quantization.scheme 'static_qdq'")
        if uses_tensorrt and self.quantization.scheme == "static_qdq" and not (
            self.quantization.symmetric_activations and self.quantization.activation_type == "int8"
        ):
            raise ValueError("TensorRT consumes symmetric int8 QDQ: set activation_type 'int8' and symmetric_activations true")
        return self

    def sha256(self) -> str:
        """A digest of the validated profile (independent of YAML layout and comments)."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- registry

_YAML_SUFFIXES = (".yaml", ".yml")


def builtin_targets_dir() -> Path:
    """The folder of shipped profiles (``targets/`` in the repository, ``edgekit/builtin_targets`` when installed)."""
    return Path(str(resources.files("edgekit.builtin_targets")))


def builtin_target_names() -> list[str]:
    return sorted(path.stem for path in builtin_targets_dir().iterdir() if path.suffix in _YAML_SUFFIXES)


def resolve_target_file(name_or_path: str) -> Path:
    """The YAML file a ``--target`` value means: a built-in name, or a path to the user's own file."""
    candidate = Path(name_or_path).expanduser()
    if candidate.suffix in _YAML_SUFFIXES or candidate.is_file():
        return candidate
    builtin = builtin_targets_dir() / f"{name_or_path}.yaml"
    if builtin.is_file():
        return builtin
    known = builtin_target_names()
    raise UnknownTargetError(
        f"unknown target {name_or_path!r}; known: {', '.join(known)}; or pass a path to a YAML file "
        "(see `edgekit targets show x86-64-cpu` for the fields)"
    )


def load_target(name_or_path: str) -> TargetProfile:
    """Load and validate a target by built-in name or file path."""
    return load_yaml_model(resolve_target_file(name_or_path), TargetProfile)


def load_builtin_targets() -> list[TargetProfile]:
    return [load_target(name) for name in builtin_target_names()]
