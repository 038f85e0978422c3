"""SmoothQuant for ONNX graphs: move activation outliers into the weights, a float-equivalent rewrite before int8.

Dynamic int8 quantizes a MatMul's input with one range per tensor, so one outlier
channel (BERT's feed-forward inputs carry channels tens of times larger than the
rest) leaves the ordinary values a few quantization steps. SmoothQuant (Xiao et
al., 2023) divides each input channel j by ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)``
and multiplies row j of the weight by the same ``s_j``: the product is unchanged,
the activations' range shrinks, the weights (quantized per output channel) take
on part of the difficulty.

BERT's post-LayerNorm residuals mean the division cannot be folded into the
preceding LayerNorm (the residual branch would see it too), so it is an explicit
per-channel ``Mul`` before each smoothed MatMul or fused Attention: an elementwise
op on the activation, small next to the matrix product. Ranges come from the
float model on calibration inputs, one row at a time (as the device runs them).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

SMOOTHED_OPS = ("MatMul", "Attention")  # a weight initializer as input 1, the activation as input 0
SUFFIX = "_smooth"


def smoothable(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Nodes whose input 0 is an activation and input 1 a 2-D weight initializer ``[in, out]`` used by no other node."""
    weights = {init.name: init for init in model.graph.initializer}
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for value in node.input:
            uses[value] = uses.get(value, 0) + 1
    return [node for node in model.graph.node
            if node.op_type in SMOOTHED_OPS and len(node.input) > 1 and node.input[1] in weights and uses[node.input[1]] == 1
            and node.input[0] not in weights and len(weights[node.input[1]].dims) == 2]


def input_channel_maxima(model: onnx.ModelProto, feeds: Iterable[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """max |x| per channel (the last axis) of every smoothable node's input, over the given inputs."""
    from edgekit.node_latency import intermediate_values

    values_in = intermediate_values(model, sorted({node.input[0] for node in smoothable(model)}))
    maxima: dict[str, np.ndarray] = {}
    for feed in feeds:
        for name, value in values_in(feed).items():
            channel_max = np.abs(value.reshape(-1, value.shape[-1])).max(axis=0)
            maxima[name] = np.maximum(maxima[name], channel_max) if name in maxima else channel_max
    return maxima


def smoothed(model: onnx.ModelProto, maxima: dict[str, np.ndarray], alpha: float) -> onnx.ModelProto:
    """A copy of ``model`` with each smoothable node's input divided, and its weight rows multiplied, by ``s``."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    weights = {init.name: init for init in result.graph.initializer}
    inserted: dict[str, onnx.NodeProto] = {}  # consumer node name -> its Mul
    for node in smoothable(result):
        weight = numpy_helper.to_array(weights[node.input[1]]).astype(np.float32)
        activation_max = np.maximum(maxima[node.input[0]], 1e-5)
        weight_max = np.maximum(np.abs(weight).max(axis=1), 1e-5)
        scale = np.maximum(activation_max ** alpha / weight_max ** (1 - alpha), 1e-5).astype(np.float32)
        weights[node.input[1]].CopyFrom(numpy_helper.from_array(weight * scale[:, None], node.input[1]))
        inverse = numpy_helper.from_array((1.0 / scale).astype(np.float32), f"{node.name}{SUFFIX}_inverse")
        result.graph.initializer.append(inverse)
        output = f"{node.name}{SUFFIX}_output"
        inserted[node.name] = helper.make_node("Mul", [node.input[0], inverse.name], [output], f"{node.name}{SUFFIX}")
        node.input[0] = output
    # Each Mul goes right before its consumer: every input it needs is produced earlier, so the order stays topological.
    ordered = []
    for node in result.graph.node:
        if node.name in inserted:
            ordered.append(inserted[node.name])
        ordered.append(node)
    del result.graph.node[:]
    result.graph.node.extend(ordered)
    return result
