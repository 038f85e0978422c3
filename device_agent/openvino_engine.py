"""The OpenVINO path for x86 CPUs: the bundle's ONNX model compiled by OpenVINO's CPU plugin.

An OpenVINO target's bundle carries an ordinary ONNX model, int8 as
QuantizeLinear/DequantizeLinear pairs written by NNCF (the build's quantize
pass); OpenVINO reads ONNX directly and runs those pairs on its int8 kernels.
Float layers are pinned to f32 (``INFERENCE_PRECISION``): left to itself the CPU
plugin computes them in bf16 on CPUs with AVX-512 BF16 or AMX and in f32
elsewhere, so the same bundle would answer differently on two x86 hosts, and
the build's fidelity gates would hold for only one of them.

``openvino`` is imported inside the functions that need it: a device without
it still loads the bundle, with ONNX Runtime on the same QDQ model
(:func:`device_agent.runtime.open_model`), and the golden check judges that.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from device_agent.bundle import Manifest
from device_agent.runtime import ManifestTensors, ModelLoadError

DEVICE = "CPU"
FLOAT_PRECISION = "f32"


class CompiledModel:
    """An ONNX model compiled for the CPU; ``run`` takes numpy feeds by input name and returns outputs in graph order.

    One infer request behind a lock: a request is not safe to share between threads, and the latency hint gives one
    request all the cores anyway; a request per thread would grow memory with the server's thread pool.
    """

    def __init__(self, model_path: Path, threads: int | None = None) -> None:
        try:
            import openvino
        except ImportError as exc:
            raise ModelLoadError(f"OpenVINO does not import on this host ({exc}); install it with `pip install 'edgekit[openvino]'`") from None
        config = {"INFERENCE_PRECISION_HINT": FLOAT_PRECISION, "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        try:
            self._compiled = openvino.Core().compile_model(str(model_path), DEVICE, config)
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses of its own for models it cannot read
            raise ModelLoadError(f"OpenVINO cannot compile {model_path.name}: {exc}") from None
        self.input_names = [port.get_any_name() for port in self._compiled.inputs]
        self._request = self._compiled.create_infer_request()
        self._lock = threading.Lock()

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        with self._lock:
            results = self._request.infer({name: feeds[name] for name in self.input_names})
            # The request reuses its output buffers on the next run: copy them out.
            return [np.array(results[port], copy=True) for port in self._compiled.outputs]


@dataclass
class OpenVINOSession(ManifestTensors):
    """A bundle's model on OpenVINO's CPU plugin, with the :class:`device_agent.runtime.Session` interface."""

    manifest: Manifest
    model_path: Path
    model: CompiledModel
    providers: list[str] = field(default_factory=lambda: [f"openvino {DEVICE} ({FLOAT_PRECISION} float layers)"])

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # By position: OpenVINO keeps the ONNX graph's output order, and the manifest lists them in that order; a port's
        # own names may include aliases (get_any_name need not be the graph output's name).
        return dict(zip([spec.name for spec in self.manifest.outputs], self.model.run(feeds), strict=True))


def load_openvino_session(manifest: Manifest, model_path: Path, threads: int | None = None) -> OpenVINOSession:
    return OpenVINOSession(manifest, model_path, CompiledModel(model_path, threads))
