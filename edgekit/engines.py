"""Running an ONNX model on the build host as the target's engine runs it, for the passes that judge and measure it.

ONNX Runtime's CPU provider for onnxruntime targets (and as the proxy for
TensorRT targets, which this host cannot run), OpenVINO's CPU plugin for
openvino targets: the quantize pass's search, the evaluate pass's gates and the
bundle's golden outputs then see the numerics the device will compute.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np


class Runner(Protocol):
    input_names: list[str]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The model's outputs in graph order, for feeds by input name."""
        ...


class OnnxRuntimeRunner:
    def __init__(self, model: Path | bytes, threads: int | None = None) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(model if isinstance(model, bytes) else str(model), sess_options=options,
                                                    providers=["CPUExecutionProvider"])
        self.input_names = [value.name for value in self.session.get_inputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, {name: feeds[name] for name in self.input_names})


def open_runner(model: Path, engine: str, threads: int | None = None) -> Runner:
    """The model ready to run on this host's CPU as ``engine`` (a target profile's ``runtime.engine``) would run it."""
    if engine == "openvino":
        from device_agent.openvino_engine import CompiledModel
        from device_agent.runtime import ModelLoadError
        from edgekit.errors import EdgekitError

        try:
            return CompiledModel(model, threads)
        except ModelLoadError as exc:  # a target's failure, reported with its gates, not the whole build's
            raise EdgekitError(f"{exc} (the openvino target judges its models with OpenVINO on this host; "
                               "pip install \"edgekit[build]\" installs it)") from None
    return OnnxRuntimeRunner(model, threads)


def runtime_label(engine: str) -> str:
    """What the evaluate pass says it measured with."""
    if engine == "openvino":
        from device_agent.openvino_engine import DEVICE, FLOAT_PRECISION

        return f"openvino {DEVICE} ({FLOAT_PRECISION} float layers)"
    return "onnxruntime CPUExecutionProvider"
