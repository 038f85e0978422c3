"""Running a bundle's model: an ONNX Runtime session with the target's execution providers, and golden checks.

Execution providers come from the bundle (e.g. TensorRT EP → CUDA EP → CPU);
those this ONNX Runtime build does not offer are skipped with a logged reason,
and CPU is always the last resort. The TensorRT EP gets an engine cache folder
keyed by the model's hash, so a device builds its engine once.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from device_agent.bundle import Manifest, TensorSpec
from device_agent.errors import UserError

log = logging.getLogger("edgekit.agent.runtime")

# Open Inference Protocol datatype ↔ numpy dtype (BYTES is handled by preprocessing).
NUMPY_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64), "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
}


class ModelLoadError(UserError):
    """The bundle's model cannot be loaded on this device."""


class GoldenCheckError(UserError):
    """The model's outputs on this device differ from the build's beyond the bundle's tolerances."""


@dataclass(frozen=True)
class RuntimeOptions:
    intra_op_threads: int | None = None
    engine_cache_dir: Path | None = None
    # ONNX Runtime's worker threads busy-wait between runs by default. In the agent they share the
    # device's few cores with the HTTP server's event loop, so spinning costs more than it saves.
    allow_spinning: bool = False


class ManifestTensors:
    """The ``inputs`` and ``outputs`` of a loaded model (ModelSession, TensorRTSession): those its ``manifest`` declares."""

    manifest: Manifest

    @property
    def inputs(self) -> list[TensorSpec]:
        return self.manifest.inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        return self.manifest.outputs


@dataclass
class ModelSession(ManifestTensors):
    """One loaded model: ``run`` takes and returns numpy arrays by tensor name."""

    manifest: Manifest
    model_path: Path
    providers: list[str]
    skipped_providers: dict[str, str] = field(default_factory=dict)
    _session: object = None

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [spec.name for spec in self.manifest.outputs]
        results = self._session.run(names, feeds)  # type: ignore[attr-defined]
        return dict(zip(names, results))


def _provider_options(name: str, model_sha256: str, options: RuntimeOptions) -> dict[str, str]:
    if name == "TensorrtExecutionProvider" and options.engine_cache_dir is not None:
        cache = options.engine_cache_dir / model_sha256[:16]
        cache.mkdir(parents=True, exist_ok=True)
        return {"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(cache)}
    return {}


def load_session(manifest: Manifest, model_path: Path, options: RuntimeOptions = RuntimeOptions()) -> ModelSession:
    """Create an ONNX Runtime session with the bundle's providers that this build offers, CPU last."""
    import onnxruntime

    available = set(onnxruntime.get_available_providers())
    wanted = [*manifest.runtime.execution_providers]
    if "CPUExecutionProvider" not in wanted:
        wanted.append("CPUExecutionProvider")
    model_sha256 = hashlib.sha256(model_path.read_bytes()).hexdigest()
    providers, skipped = [], {}
    for name in wanted:
        if name in available:
            providers.append(name)
        else:
            skipped[name] = f"this onnxruntime build does not offer {name}"
            log.warning("skipping execution provider %s: %s", name, skipped[name])
    session_options = onnxruntime.SessionOptions()
    if options.intra_op_threads:
        session_options.intra_op_num_threads = options.intra_op_threads
    session_options.add_session_config_entry("session.intra_op.allow_spinning", "1" if options.allow_spinning else "0")
    try:
        session = onnxruntime.InferenceSession(
            str(model_path),
            sess_options=session_options,
            providers=[(name, _provider_options(name, model_sha256, options)) for name in providers],
        )
    except Exception as exc:  # onnxruntime raises its own exception types for bad models
        raise ModelLoadError(f"ONNX Runtime cannot load {model_path.name}: {exc}") from None
    return ModelSession(manifest, model_path, list(session.get_providers()), skipped, session)


class Session(Protocol):
    """What serving needs from a loaded model: ONNX Runtime's ModelSession, a native TensorRTSession or an OpenVINOSession."""

    manifest: Manifest
    providers: list[str]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def open_model(manifest: Manifest, model_path: Path, options: RuntimeOptions = RuntimeOptions()) -> Session:
    """A native TensorRT engine for tensorrt bundles where one can be built here, OpenVINO for openvino bundles where it
    imports; ONNX Runtime otherwise (the model is an ordinary ONNX file, QDQ for int8: the golden check judges the result)."""
    if manifest.runtime.engine == "openvino":
        from device_agent.openvino_engine import load_openvino_session  # imported late: it imports this module

        try:
            return load_openvino_session(manifest, model_path, options.intra_op_threads)
        except ModelLoadError as exc:
            log.warning("using ONNX Runtime instead of OpenVINO: %s", exc)
    if manifest.runtime.engine == "tensorrt" and options.engine_cache_dir is not None:
        from device_agent.tensorrt_engine import load_tensorrt_session  # imported late: it imports this module

        try:
            return load_tensorrt_session(manifest, model_path, options.engine_cache_dir / "tensorrt")
        except ModelLoadError as exc:
            log.warning("using ONNX Runtime instead of a native TensorRT engine: %s", exc)
    return load_session(manifest, model_path, options)


def run_golden_check(session: Session, golden_path: Path) -> float:
    """Run the bundle's golden inputs and compare with the recorded outputs; return the worst error.

    The golden file is an ``.npz`` with ``input:<name>`` and ``output:<name>`` arrays.
    Raises GoldenCheckError naming the output that differs.
    """
    golden = session.manifest.golden
    with np.load(golden_path, allow_pickle=False) as data:
        feeds = {key.removeprefix("input:"): data[key] for key in data.files if key.startswith("input:")}
        expected = {key.removeprefix("output:"): data[key] for key in data.files if key.startswith("output:")}
    if not feeds or not expected:
        raise GoldenCheckError(f"{golden.file} holds no input:/output: arrays; rebuild the bundle")
    try:
        outputs = session.run(feeds)
    except Exception as exc:
        raise GoldenCheckError(f"the model failed on its own golden inputs: {exc}") from None
    worst = 0.0
    for name, want in expected.items():
        got = outputs.get(name)
        if got is None or got.shape != want.shape:
            raise GoldenCheckError(f"golden output {name!r}: shape {None if got is None else got.shape}, expected {want.shape}")
        error = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64)))) if want.size else 0.0
        if not np.allclose(got, want, atol=golden.atol, rtol=golden.rtol):
            raise GoldenCheckError(
                f"golden output {name!r} differs on this device by up to {error:.3g} "
                f"(tolerance atol {golden.atol:g}, rtol {golden.rtol:g}); the model does not behave here as it did at build time"
            )
        worst = max(worst, error)
    return worst
