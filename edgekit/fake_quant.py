"""ONNX Runtime's dynamic int8 numerics, emulated in PyTorch, so a model can train to survive them.

What ``quantize_dynamic`` (per-channel, symmetric int8 weights) does to a BERT-style
encoder after ONNX Runtime's transformer fusions, and what this module reproduces:

- every Linear (the fused QKV projection, attention output, both feed-forward
  projections, pooler, classifier): weights to int8 per output channel,
  ``scale = max|w| / 127``, zero point 0; the input to uint8 per tensor at run time
  (``DynamicQuantizeLinear``: the range is ``[min(x, 0), max(x, 0)]``, 255 steps, the
  zero point rounded);
- the fused embedding layer (``QEmbedLayerNormalization``): the word, position and
  token-type tables and the embedding LayerNorm's weight and bias, each to uint8 per
  tensor with the same range rule.

The attention scores, softmax, GELU and the other LayerNorms stay float, as they do
in ONNX Runtime's int8 kernels. Run-time ranges are taken per example, over its real
tokens only (the model's ``attention_mask``): that is exactly ONNX Runtime's
per-tensor range when the example runs alone, unpadded, as the quantize and evaluate
passes score dynamic int8 and as a device serves one request. Padding positions are
quantized with their example's range (clamped); nothing reads them. Rounding is half
to even in both. Gradients pass the rounding straight through.

``tests/edgekit/test_fake_quant.py`` checks a fake-quantized tiny BERT against the
ONNX Runtime int8 model of the same weights (within 1e-4), and padded batches
against rows run alone. On the fine-tuned all-MiniLM-L6-v2 models of
bench/README.md ("int8 fidelity") the emulated and ONNX Runtime agreements with fp32
are equal, or within a few rows in 300.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

INT8_LIMIT = 127  # symmetric int8 weights use [-127, 127]
UINT8_STEPS = 255


def _straight_through(x: "torch.Tensor", quantized: "torch.Tensor") -> "torch.Tensor":
    return x + (quantized - x).detach()


def _uint8_fake_quant(x: "torch.Tensor", low: "torch.Tensor", high: "torch.Tensor") -> "torch.Tensor":
    """x through uint8 with the range [low, high] (which must hold 0): ONNX Runtime's asymmetric rule."""
    import torch

    scale = ((high - low) / UINT8_STEPS).clamp_min(torch.finfo(torch.float32).tiny)
    zero_point = torch.clamp(torch.round(-low / scale), 0, UINT8_STEPS)
    quantized = (torch.clamp(torch.round(x / scale) + zero_point, 0, UINT8_STEPS) - zero_point) * scale
    return _straight_through(x, quantized)


def dynamic_activation(x: "torch.Tensor", tokens: "torch.Tensor | None" = None) -> "torch.Tensor":
    """``DynamicQuantizeLinear`` then dequantization, with one range per example (dimension 0).

    ``tokens`` (``[batch, sequence]``, nonzero at real tokens) limits the range to an
    example's real tokens when ``x`` is ``[batch, sequence, ...]``: the range the example
    gets when it runs unpadded.
    """
    import torch

    values = x.detach().float()
    if tokens is not None and values.dim() >= 3 and tuple(values.shape[:2]) == tuple(tokens.shape):
        real = tokens.bool().reshape(*tokens.shape, *(1,) * (values.dim() - 2))
        values = torch.where(real, values, torch.zeros((), dtype=values.dtype, device=values.device))  # the range holds 0 anyway
    low = values.reshape(x.shape[0], -1).amin(dim=1).clamp_max(0)
    high = values.reshape(x.shape[0], -1).amax(dim=1).clamp_min(0)
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    return _uint8_fake_quant(x.float(), low.reshape(shape), high.reshape(shape)).to(x.dtype)


def per_tensor_uint8(weight: "torch.Tensor") -> "torch.Tensor":
    """A weight (embedding table, LayerNorm weight or bias) through uint8 with one range for the tensor."""
    detached = weight.detach()
    return _uint8_fake_quant(weight, detached.min().clamp_max(0), detached.max().clamp_min(0))


def per_channel_int8(weight: "torch.Tensor") -> "torch.Tensor":
    """A Linear weight ``[out, in]`` through symmetric int8 with one scale per output channel (row)."""
    import torch

    scale = (weight.detach().abs().amax(dim=1, keepdim=True) / INT8_LIMIT).clamp_min(torch.finfo(torch.float32).tiny)
    quantized = torch.clamp(torch.round(weight / scale), -INT8_LIMIT, INT8_LIMIT) * scale
    return _straight_through(weight, quantized)


def _parametrization(function) -> "torch.nn.Module":
    """``function`` as a parametrization: the weight as the int8 kernels will see it."""
    import torch

    class FakeQuantized(torch.nn.Module):
        def forward(self, weight):
            return function(weight)

    return FakeQuantized()


def _embedding_weights(model: "torch.nn.Module") -> list[tuple["torch.nn.Module", str]]:
    """(module, parameter name) of what the fused embedding layer quantizes: the three tables and the LayerNorm."""
    import torch

    embeddings = getattr(getattr(model, "base_model", model), "embeddings", None)
    if embeddings is None:
        return []
    found = [(module, "weight") for module in embeddings.children() if isinstance(module, torch.nn.Embedding)]
    norm = getattr(embeddings, "LayerNorm", None)
    if isinstance(norm, torch.nn.LayerNorm):
        found += [(norm, "weight"), (norm, "bias")]
    return found


@contextlib.contextmanager
def dynamic_int8(model: "torch.nn.Module") -> Iterator["torch.nn.Module"]:
    """Within the block, ``model`` computes as ONNX Runtime's dynamic int8 model of its weights would.

    The float weights stay the trained parameters (the fake quantization is a
    parametrization over them) and are left as trained on exit, so training inside
    the block teaches the float weights to quantize well, and the model exported
    afterwards is quantized by ``quantize_dynamic`` to exactly the values trained with.
    """
    import torch
    from torch.nn.utils import parametrize

    tokens: dict[str, torch.Tensor | None] = {"mask": None}  # the running batch's attention mask

    def remember_mask(_module, args, kwargs):
        tokens["mask"] = kwargs.get("attention_mask")

    linears = [module for module in model.modules() if isinstance(module, torch.nn.Linear)]
    hooks = [model.register_forward_pre_hook(remember_mask, with_kwargs=True)]
    hooks += [module.register_forward_pre_hook(lambda _module, args: (dynamic_activation(args[0], tokens["mask"]), *args[1:]))
              for module in linears]
    parametrized = [(module, "weight", per_channel_int8) for module in linears]
    parametrized += [(module, name, per_tensor_uint8) for module, name in _embedding_weights(model)]
    for module, name, function in parametrized:
        parametrize.register_parametrization(module, name, _parametrization(function))
    try:
        yield model
    finally:
        for hook in hooks:
            hook.remove()
        for module, name, _ in parametrized:
            if parametrize.is_parametrized(module, name):
                parametrize.remove_parametrizations(module, name, leave_parametrized=False)
