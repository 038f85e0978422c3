"""The native TensorRT path: build (or load from a cache) a serialized engine for this GPU, and run it.

TensorRT engines are tied to the GPU (compute capability) and the exact
TensorRT version, so a bundle for a TensorRT target carries an ONNX model (an
explicitly quantized QDQ model for int8) plus :class:`EngineBuildOptions` in
``runtime.engine_build``. The device builds its engine on first load and caches
the serialized plan under a key made of the model's hash, the TensorRT
version, the compute capability and the options (:func:`engine_cache_key`);
the build host does the same only when its GPU and TensorRT match the target.

Dependencies, all imported inside the functions that need them so that
importing this module stays light (no tensorrt, no CUDA, no torch):

- ``tensorrt`` (10.x): builder, ONNX parser and runtime. On Jetson it comes
  with JetPack (``python3-libnvinfer``); elsewhere ``pip install tensorrt``.
- ``cuda-python`` (``cuda.bindings.runtime``, or ``cuda.cudart`` in releases
  before 12.6): device memory, copies and the stream the engine runs on. It was
  chosen over torch because the device agent never imports torch, and over
  pycuda because NVIDIA's own TensorRT samples use it.

Only the first GPU (device 0) is used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from device_agent.bundle import Manifest
from device_agent.errors import UserError
from device_agent.files import write_atomically
from device_agent.runtime import NUMPY_DTYPES, ManifestTensors, ModelLoadError

log = logging.getLogger("edgekit.agent.tensorrt")

# Names that ONNX exporters (transformers, optimum) give the dimensions a
# target profile calls ``batch`` and ``sequence``.
DIM_ALIASES = {"batch_size": "batch", "sequence_length": "sequence"}
PLAN_SUFFIX = ".plan"
_CHUNK = 1 << 20


class EngineBuildError(UserError):
    """A TensorRT engine cannot be built or loaded (bad options, parser or builder failure)."""


# --------------------------------------------------------------------------- build options


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ShapeRange(_Strict):
    """One input's shapes in the optimisation profile: the engine accepts any shape between min and max."""

    min: list[int]
    opt: list[int]
    max: list[int]

    @model_validator(mode="after")
    def _ordered(self) -> "ShapeRange":
        if not len(self.min) == len(self.opt) == len(self.max):
            raise ValueError(f"min {self.min}, opt {self.opt} and max {self.max} have different ranks")
        for axis, (low, mid, high) in enumerate(zip(self.min, self.opt, self.max)):
            if not 1 <= low <= mid <= high:
                raise ValueError(f"axis {axis} needs 1 <= min <= opt <= max, got {low}, {mid}, {high}")
        return self


class EngineBuildOptions(_Strict):
    """What a device needs to build the same engine the build meant: ``runtime.engine_build`` in the manifest.

    ``precision`` int8 means the ONNX model is explicitly quantized (QDQ): the
    builder gets the INT8 and FP16 flags, so layers between Q/DQ pairs run int8
    and the rest may run fp16.
    """

    precision: Literal["int8", "fp16", "fp32"]
    workspace_mb: int = Field(gt=0, description="scratch memory the builder's tactics may use")
    profile: dict[str, ShapeRange] = Field(default={}, description="one optimisation profile, by input name")

    def to_manifest(self) -> dict[str, Any]:
        """The JSON document stored in ``Manifest.runtime.engine_build``."""
        return self.model_dump(mode="json")

    @classmethod
    def from_manifest(cls, document: Mapping[str, Any]) -> "EngineBuildOptions":
        """Read ``runtime.engine_build``; raises EngineBuildError naming every problem."""
        try:
            return cls.model_validate(dict(document))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(part) for part in error['loc']) or '(document)'}: {error['msg']}" for error in exc.errors()
            )
            raise EngineBuildError(f"runtime.engine_build is not valid TensorRT build options ({problems}); rebuild the bundle") from None


def _dim_bounds(value: Any) -> tuple[int, int, int]:
    """(min, opt, max) from a ``{min, opt, max}`` mapping or an object with those attributes (edgekit's DimRange)."""
    if isinstance(value, Mapping):
        return int(value["min"]), int(value["opt"]), int(value["max"])
    return int(value.min), int(value.opt), int(value.max)


def profile_shapes(inputs: Mapping[str, Sequence[int | str]], dims: Mapping[str, Any]) -> dict[str, ShapeRange]:
    """The optimisation profile for a model's inputs: fixed dimensions stay, symbolic ones take the target's range.

    ``inputs`` maps each input name to its shape (an int for a fixed dimension, a
    name for a symbolic one); ``dims`` maps dimension names to ``{min, opt, max}``.
    An input ``[batch, sequence]`` with batch {1, 1, 8} and sequence {1, 128, 256}
    gives min [1, 1], opt [1, 128], max [8, 256]. Exporters' ``batch_size`` and
    ``sequence_length`` are read as ``batch`` and ``sequence``.
    """
    profile: dict[str, ShapeRange] = {}
    for name, shape in inputs.items():
        low, mid, high = [], [], []
        for axis, dim in enumerate(shape):
            if isinstance(dim, int):
                if dim < 1:
                    raise EngineBuildError(f"input {name!r} axis {axis} has size {dim}; a fixed dimension must be at least 1")
                bounds = (dim, dim, dim)
            else:
                key = dim if dim in dims else DIM_ALIASES.get(dim, dim)
                if key not in dims:
                    known = ", ".join(sorted(dims)) or "none"
                    raise EngineBuildError(
                        f"input {name!r} axis {axis} is the symbolic dimension {dim!r}, which has no range "
                        f"(dimension ranges known: {known})"
                    )
                bounds = _dim_bounds(dims[key])
            low.append(bounds[0])
            mid.append(bounds[1])
            high.append(bounds[2])
        try:
            profile[name] = ShapeRange(min=low, opt=mid, max=high)
        except ValidationError as exc:
            raise EngineBuildError(f"input {name!r}: {exc.errors()[0]['msg']}") from None
    return profile


# --------------------------------------------------------------------------- cache keys


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def engine_cache_key(model_sha256: str, tensorrt_version: str, compute_capability: str, options: EngineBuildOptions) -> str:
    """The name of a cached engine: readable parts first, then a digest of everything the engine depends on."""
    document = {
        "model_sha256": model_sha256,
        "tensorrt_version": tensorrt_version,
        "compute_capability": compute_capability,
        "options": options.to_manifest(),
    }
    digest = hashlib.sha256(json.dumps(document, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()
    readable = f"{model_sha256[:12]}-trt{tensorrt_version}-sm{compute_capability.replace('.', '')}"
    return f"{re.sub(r'[^A-Za-z0-9.-]', '_', readable)}-{digest[:16]}"


# --------------------------------------------------------------------------- lazy imports


def _import_tensorrt() -> Any:
    try:
        import tensorrt
    except (ImportError, OSError) as exc:  # OSError: the wheel imports but libnvinfer does not load
        raise EngineBuildError(_tensorrt_missing(exc)) from None
    return tensorrt


def _tensorrt_missing(exc: BaseException) -> str:
    return (
        f"tensorrt is not importable ({exc}); on Jetson install JetPack's python3-libnvinfer, "
        "elsewhere `pip install edgekit[tensorrt]` on a CUDA host"
    )


def _import_cudart() -> Any:
    """cuda-python's runtime API (``cuda.bindings.runtime`` from 12.6 on, ``cuda.cudart`` before)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # type: ignore[no-redef]
        except ImportError as exc:
            raise EngineBuildError(f"the CUDA runtime binding is not importable ({exc}); `pip install cuda-python`") from None
    return cudart


def _cuda_check(cudart: Any, result: Any) -> Any:
    """cuda-python returns ``(error, *values)``: raise on an error, return the value(s)."""
    if not isinstance(result, tuple):
        result = (result,)
    error, values = result[0], result[1:]
    if error != cudart.cudaError_t.cudaSuccess:
        try:
            name = cudart.cudaGetErrorName(error)[1].decode()
        except Exception:  # the error itself is what matters
            name = str(error)
        raise EngineBuildError(f"CUDA call failed: {name}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def cuda_compute_capability(cudart: Any | None = None) -> str:
    """The compute capability of GPU 0 as ``"major.minor"``; raises EngineBuildError without a GPU."""
    cudart = cudart or _import_cudart()
    properties = _cuda_check(cudart, cudart.cudaGetDeviceProperties(0))
    return f"{properties.major}.{properties.minor}"


def tensorrt_problem() -> str | None:
    """Why the native TensorRT path cannot run here (for logs and test skips), or None when it can."""
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError) as exc:
        return _tensorrt_missing(exc)
    try:
        cudart = _import_cudart()
    except EngineBuildError as exc:
        return str(exc)
    try:
        count = _cuda_check(cudart, cudart.cudaGetDeviceCount())
    except Exception as exc:  # no driver, no device, driver too old: all mean "no GPU to run on"
        return f"no usable CUDA GPU ({exc})"
    if not count:
        return "no CUDA GPU on this device"
    return None


_LOGGER_LOCK = threading.Lock()
_TRT_LOGGER: Any = None
_RECENT_ERRORS: deque[str] = deque(maxlen=8)


def _trt_logger(trt: Any) -> Any:
    """One logger for the process (TensorRT expects a single one) that forwards to Python logging."""
    global _TRT_LOGGER
    with _LOGGER_LOCK:
        if _TRT_LOGGER is None:
            severity = trt.ILogger.Severity
            levels = {
                severity.INTERNAL_ERROR: logging.ERROR, severity.ERROR: logging.ERROR,
                severity.WARNING: logging.WARNING, severity.INFO: logging.DEBUG, severity.VERBOSE: logging.DEBUG,
            }

            class _Forward(trt.ILogger):
                def __init__(self) -> None:
                    trt.ILogger.__init__(self)

                def log(self, level: Any, message: str) -> None:
                    try:  # an exception must never travel back into TensorRT's C++ caller
                        python_level = levels.get(level, logging.INFO)
                        if python_level >= logging.ERROR:
                            _RECENT_ERRORS.append(message)
                        log.log(python_level, "tensorrt: %s", message)
                    except Exception:
                        pass

            _TRT_LOGGER = _Forward()
        return _TRT_LOGGER


def _recent_errors() -> str:
    errors = list(_RECENT_ERRORS)
    _RECENT_ERRORS.clear()
    return f": {' | '.join(errors[-3:])}" if errors else " (see the tensorrt log lines above)"


# --------------------------------------------------------------------------- building


def _serialize_engine(onnx_path: Path, options: EngineBuildOptions) -> bytes:
    """Parse the ONNX model and build a serialized engine for GPU 0 with these options."""
    trt = _import_tensorrt()
    logger = _trt_logger(trt)
    _RECENT_ERRORS.clear()
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(index)) for index in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT cannot parse {onnx_path.name}: {errors or 'unknown parser error'}")

    network_inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    unknown = sorted(set(options.profile) - set(network_inputs))
    if unknown:
        raise EngineBuildError(f"engine_build.profile names {unknown}, which are not inputs of the model ({sorted(network_inputs)})")
    profile, shaped = builder.create_optimization_profile(), False
    for name, tensor in network_inputs.items():
        shape = list(tensor.shape)
        ranges = options.profile.get(name)
        if ranges is None:
            if any(dim < 0 for dim in shape):
                raise EngineBuildError(f"input {name!r} has dynamic shape {shape} but engine_build.profile gives it no range")
            continue
        if len(ranges.min) != len(shape):
            raise EngineBuildError(f"input {name!r} has rank {len(shape)}, engine_build.profile gives rank {len(ranges.min)}")
        profile.set_shape(name, ranges.min, ranges.opt, ranges.max)
        shaped = True

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mb << 20)
    if options.precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if options.precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)  # explicit quantization: scales come from the model's Q/DQ nodes
    if shaped:  # a model with only fixed shapes needs no profile
        config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError(f"TensorRT could not build an engine for {onnx_path.name}{_recent_errors()}")
    return bytes(memoryview(plan))


def build_engine_file(onnx_path: Path, options: EngineBuildOptions, destination: Path) -> float:
    """Build the engine and write its plan to ``destination`` atomically; return the build time in seconds."""
    started = time.perf_counter()
    log.info("building a TensorRT engine for %s (%s); this can take minutes", onnx_path.name, options.precision)
    plan = _serialize_engine(onnx_path, options)
    write_atomically(destination, plan)
    seconds = time.perf_counter() - started
    log.info("built %s in %.1f s (%d bytes)", destination.name, seconds, len(plan))
    return seconds


_BUILD_LOCK = threading.Lock()


def build_or_load_engine(onnx_path: Path, options: EngineBuildOptions, cache_dir: Path) -> Path:
    """The cached plan for this model, TensorRT version, GPU and options; built (and cached) when absent.

    The plan is ``cache_dir/<engine_cache_key>.plan``, with a ``.json`` beside it
    saying what it was built from. Raises EngineBuildError when tensorrt or CUDA
    is missing or the build fails.
    """
    trt = _import_tensorrt()
    compute_capability = cuda_compute_capability()
    key = engine_cache_key(file_sha256(onnx_path), trt.__version__, compute_capability, options)
    plan_path = cache_dir / f"{key}{PLAN_SUFFIX}"
    with _BUILD_LOCK:  # two loads of one model in this process build it once
        if plan_path.is_file():
            log.info("TensorRT engine cache hit: %s", plan_path.name)
            return plan_path
        for stale in cache_dir.glob(f".{plan_path.name}.*.tmp"):  # left by a build that was killed
            stale.unlink(missing_ok=True)
        seconds = build_engine_file(onnx_path, options, plan_path)
        record = {
            "model_file": onnx_path.name,
            "tensorrt_version": trt.__version__,
            "compute_capability": compute_capability,
            "options": options.to_manifest(),
            "build_seconds": round(seconds, 3),
        }
        write_atomically(plan_path.with_suffix(".json"), json.dumps(record, indent=2, sort_keys=True).encode())
    return plan_path


# --------------------------------------------------------------------------- running


class TensorRTSession(ManifestTensors):
    """One deserialized engine with the interface of ``runtime.ModelSession``: ``run`` maps numpy arrays by name.

    Runs are serialised by a lock (an execution context is not thread-safe).
    Device buffers grow to the largest shape seen and are reused. Call
    :meth:`close` to free GPU memory early; garbage collection frees it too.
    """

    def __init__(self, manifest: Manifest, model_path: Path, engine_path: Path, options: EngineBuildOptions,
                 trt: Any, cudart: Any, runtime: Any, engine: Any) -> None:
        self.manifest = manifest
        self.model_path = model_path
        self.engine_path = engine_path
        self.options = options
        self.providers = [f"tensorrt {trt.__version__} (native engine)"]
        self.skipped_providers: dict[str, str] = {}
        self._trt, self._cudart = trt, cudart
        self._runtime, self._engine = runtime, engine  # the runtime must outlive its engine
        self._lock = threading.Lock()
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, capacity in bytes)
        self._stream: Any = None
        self._context: Any = None
        names = [engine.get_tensor_name(index) for index in range(engine.num_io_tensors)]
        self._input_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._output_names = [n for n in names if n not in self._input_names]
        self._dtypes: dict[str, np.dtype] = {}
        for name in names:
            try:
                self._dtypes[name] = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            except TypeError:
                raise EngineBuildError(f"engine tensor {name!r} has type {engine.get_tensor_dtype(name)}, which numpy cannot hold") from None
        missing = [spec.name for spec in [*manifest.inputs, *manifest.outputs] if spec.name not in names]
        if missing:
            raise EngineBuildError(f"the engine has no tensors {missing} that the manifest declares (it has {names})")
        self._context = engine.create_execution_context()
        if self._context is None:
            raise EngineBuildError(f"TensorRT could not create an execution context for {engine_path.name}{_recent_errors()}")
        self._stream = _cuda_check(cudart, cudart.cudaStreamCreate())

    def _device_buffer(self, name: str, nbytes: int) -> int:
        pointer, capacity = self._buffers.get(name, (0, 0))
        if capacity < nbytes or not pointer:
            if pointer:
                _cuda_check(self._cudart, self._cudart.cudaFree(pointer))
                del self._buffers[name]
            capacity = max(nbytes, 256)
            pointer = int(_cuda_check(self._cudart, self._cudart.cudaMalloc(capacity)))
            self._buffers[name] = (pointer, capacity)
        return pointer

    def _check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        ranges = self.options.profile.get(name)
        if ranges is None:
            return
        if len(shape) != len(ranges.min) or any(not low <= dim <= high for dim, low, high in zip(shape, ranges.min, ranges.max)):
            raise ValueError(f"input {name!r} has shape {list(shape)}, outside the engine's profile (min {ranges.min}, max {ranges.max})")

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cudart = self._cudart
        with self._lock:
            if self._context is None:
                raise RuntimeError("this TensorRT session is closed")
            arrays: dict[str, np.ndarray] = {}
            for name in self._input_names:
                if name not in feeds:
                    raise ValueError(f"missing input {name!r}; the model takes {self._input_names}")
                array = np.ascontiguousarray(feeds[name], dtype=self._dtypes[name])
                self._check_shape(name, array.shape)
                if not self._context.set_input_shape(name, array.shape):
                    raise ValueError(f"TensorRT refused shape {list(array.shape)} for input {name!r}")
                arrays[name] = array
            results: dict[str, np.ndarray] = {}
            for name in self._output_names:
                shape = tuple(self._context.get_tensor_shape(name))
                if any(dim < 0 for dim in shape):
                    raise RuntimeError(f"output {name!r} has a data-dependent shape {list(shape)}, which this runner does not support")
                results[name] = np.empty(shape, dtype=self._dtypes[name])
            for name, array in {**arrays, **results}.items():
                self._context.set_tensor_address(name, self._device_buffer(name, array.nbytes))
            to_device, to_host = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
            for name, array in arrays.items():
                if array.nbytes:
                    _cuda_check(cudart, cudart.cudaMemcpyAsync(self._buffers[name][0], array.ctypes.data, array.nbytes, to_device, self._stream))
            if not self._context.execute_async_v3(int(self._stream)):
                raise RuntimeError(f"TensorRT failed to run {self.engine_path.name}{_recent_errors()}")
            for name, array in results.items():
                if array.nbytes:
                    _cuda_check(cudart, cudart.cudaMemcpyAsync(array.ctypes.data, self._buffers[name][0], array.nbytes, to_host, self._stream))
            _cuda_check(cudart, cudart.cudaStreamSynchronize(self._stream))
        answer = {}
        for spec in self.manifest.outputs:
            want = NUMPY_DTYPES.get(spec.datatype)
            value = results[spec.name]
            answer[spec.name] = value.astype(want) if want is not None and value.dtype != want else value
        return answer

    def close(self) -> None:
        """Free the device buffers and the stream; the session cannot run afterwards."""
        with self._lock:
            for pointer, _ in self._buffers.values():
                self._cudart.cudaFree(pointer)
            self._buffers.clear()
            if self._stream is not None:
                self._cudart.cudaStreamDestroy(self._stream)
                self._stream = None
            self._context = None  # the context goes before the engine it came from
            self._engine = None

    def __enter__(self) -> "TensorRTSession":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: CUDA may already be gone
            pass


def _deserialize(trt: Any, plan_path: Path) -> tuple[Any, Any]:
    runtime = trt.Runtime(_trt_logger(trt))
    try:
        engine = runtime.deserialize_cuda_engine(plan_path.read_bytes())
    except Exception as exc:  # a damaged plan: treated like TensorRT's None, it is rebuilt
        log.warning("cannot deserialize %s: %s", plan_path.name, exc)
        engine = None
    return runtime, engine


def load_tensorrt_session(manifest: Manifest, model_path: Path, cache_dir: Path) -> TensorRTSession:
    """Build or load the bundle's engine for this GPU and open it.

    Raises ModelLoadError (the caller falls back to ONNX Runtime and logs why)
    when tensorrt or CUDA is missing, the bundle carries no build options, or
    the build fails. A cached plan that no longer deserializes is rebuilt once.
    """
    problem = tensorrt_problem()
    if problem:
        raise ModelLoadError(f"native TensorRT engine unavailable: {problem}")
    if manifest.runtime.engine_build is None:
        raise ModelLoadError("the bundle carries no runtime.engine_build options; rebuild it for a TensorRT target")
    try:
        options = EngineBuildOptions.from_manifest(manifest.runtime.engine_build)
        trt, cudart = _import_tensorrt(), _import_cudart()
        plan_path = build_or_load_engine(model_path, options, cache_dir)
        runtime, engine = _deserialize(trt, plan_path)
        if engine is None:
            log.warning("cached engine %s does not deserialize; rebuilding it", plan_path.name)
            plan_path.unlink(missing_ok=True)
            plan_path = build_or_load_engine(model_path, options, cache_dir)
            runtime, engine = _deserialize(trt, plan_path)
            if engine is None:
                raise EngineBuildError(f"TensorRT cannot deserialize the engine it just built{_recent_errors()}")
        return TensorRTSession(manifest, model_path, plan_path, options, trt, cudart, runtime, engine)
    except EngineBuildError as exc:
        raise ModelLoadError(f"native TensorRT engine unavailable: {exc}") from None
    except Exception as exc:  # a device keeps serving through ONNX Runtime; the traceback goes to the log
        log.exception("unexpected failure on the native TensorRT path")
        raise ModelLoadError(f"native TensorRT engine unavailable: {type(exc).__name__}: {exc}") from None
