"""What quantizing each node of an ONNX model saves, measured on this host with ONNX Runtime.

The quantize pass's search needs a cost for every node it might keep in float. A
node's cost is the time its int8 form saves: it is measured here on the node alone,
cut out of the float model with the weights and the run-time inputs it sees for one
representative example, once in float and once quantized by the target's recipe.
Nodes with the same operator, attributes and weight shapes cost the same, so each
such group is timed once (the six layers of a BERT encoder share five shapes).
A node whose int8 form is not faster costs nothing to keep in float.

Times are medians of many runs of the one node, so they are far steadier than the
whole model's latency, but they are still this host's: a build for another CPU
measures its own host (the evaluate pass labels such numbers a proxy).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

RUNS = 40  # timed runs per node and precision, after WARMUP
WARMUP = 5


def _untyped(name: str) -> onnx.ValueInfoProto:
    """A graph output without a declared type: ONNX Runtime types it itself (contrib ops' outputs defeat ONNX's inference)."""
    value = onnx.ValueInfoProto()
    value.name = name
    return value


def intermediate_values(model: onnx.ModelProto, names: Sequence[str]) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """A function from feeds (extra keys ignored) to the values ``names`` take inside ``model``: one session, made once."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    outputs = {value.name for value in probe.graph.output}
    probe.graph.output.extend(_untyped(name) for name in names if name not in outputs)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    accepted = {value.name for value in session.get_inputs()}
    wanted = list(names)

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not wanted:  # ONNX Runtime reads no output names as "every output"
            return {}
        return dict(zip(wanted, session.run(wanted, {k: v for k, v in feeds.items() if k in accepted}), strict=True))

    return run


def node_inputs(float_model: onnx.ModelProto, nodes: Sequence[str], feeds: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """The run-time (non-weight) inputs each node sees for ``feeds``: one run of the float model, with those values as outputs."""
    graph = float_model.graph
    weights = {init.name for init in graph.initializer}
    by_name = {node.name: node for node in graph.node}
    wanted = sorted({value for name in nodes for value in by_name[name].input if value and value not in weights})
    values = intermediate_values(float_model, wanted)(feeds)
    return {name: {value: values[value] for value in by_name[name].input if value in values} for name in nodes}


def single_node_model(float_model: onnx.ModelProto, node_name: str, inputs: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The node alone: its weights as initializers, its run-time inputs as graph inputs typed from ``inputs``."""
    graph = float_model.graph
    node = next(node for node in graph.node if node.name == node_name)
    weights = [init for init in graph.initializer if init.name in set(node.input)]
    graph_inputs = [onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(value.dtype), value.shape)
                    for name, value in inputs.items()]
    graph_outputs = [_untyped(name) for name in node.output if name]
    alone = onnx.helper.make_graph([node], f"{node_name}-alone", graph_inputs, graph_outputs, initializer=weights)
    model = onnx.helper.make_model(alone, opset_imports=list(float_model.opset_import))
    model.ir_version = float_model.ir_version
    return model


def _signature(node: onnx.NodeProto, weight_shapes: dict[str, tuple[int, ...]], inputs: dict[str, np.ndarray]) -> tuple:
    attributes = tuple(sorted((a.name, repr(onnx.helper.get_attribute_value(a))) for a in node.attribute))

    def shape(value: str) -> tuple[int, ...] | None:
        if value in weight_shapes:
            return weight_shapes[value]
        return tuple(inputs[value].shape) if value in inputs else None

    shapes = tuple(shape(value) for value in node.input)
    return (node.domain, node.op_type, attributes, shapes)


def _median_ms(model: Path, feeds: dict[str, np.ndarray], threads: int | None) -> float:
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model), sess_options=options, providers=["CPUExecutionProvider"])
    for _ in range(WARMUP):
        session.run(None, feeds)
    times = []
    for _ in range(RUNS):
        started = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def quantization_gains(
    float_model: onnx.ModelProto,
    nodes: Sequence[str],
    feeds: dict[str, np.ndarray],
    quantize: Callable[[Path, Path], None],
    work_dir: Path,
    threads: int | None = None,
) -> dict[str, float]:
    """Milliseconds each of ``nodes`` saves, quantized by ``quantize(float_file, int8_file)``, at the inputs ``feeds`` give it.

    Negative: the int8 node is slower than the float one.
    """
    seen = node_inputs(float_model, nodes, feeds)
    by_name = {node.name: node for node in float_model.graph.node}
    weight_shapes = {init.name: tuple(init.dims) for init in float_model.graph.initializer}
    work_dir.mkdir(parents=True, exist_ok=True)
    measured: dict[tuple, float] = {}
    gains = {}
    for index, name in enumerate(nodes):
        key = _signature(by_name[name], weight_shapes, seen[name])
        if key not in measured:
            float_file, int8_file = work_dir / f"node-{index}-float.onnx", work_dir / f"node-{index}-int8.onnx"
            onnx.save(single_node_model(float_model, name, seen[name]), float_file)
            quantize(float_file, int8_file)
            measured[key] = _median_ms(float_file, seen[name], threads) - _median_ms(int8_file, seen[name], threads)
            float_file.unlink()
            int8_file.unlink()
        gains[name] = measured[key]
    return gains
