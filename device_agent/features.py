"""Drift features, one implementation: the build computes the reference with it, the device its windows.

Every function takes a batch and returns ``{feature name: 1-D array, one value
per row}``. Names say where a feature comes from (``input.`` or ``output.``);
``output.predicted_class`` is categorical (values are class indices), every
other feature is numeric. Nothing here keeps raw data: the monitor only bins
these values.

Text features are computed from the model's token tensors, so they reflect
exactly what the model saw: ``input.token_count`` (real tokens, special tokens
included, after truncation), ``input.unknown_rate`` (share of them that are the
unknown token) and ``input.truncated`` (1 when the text filled ``max_length``:
a text of exactly ``max_length`` tokens counts as truncated, on both sides).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

CATEGORICAL = frozenset({"output.predicted_class"})
# Larger images are sampled on a regular grid of about this many pixels: the
# statistics barely move and the cost per request stays flat.
_IMAGE_SAMPLE_PIXELS = 4096
# A numeric tensor with more values per row than this is summarised (mean, std) rather than one feature each.
MAX_TENSOR_FEATURES = 16

Features = dict[str, np.ndarray]


def is_categorical(name: str) -> bool:
    return name in CATEGORICAL


def text_features(input_ids: np.ndarray, attention_mask: np.ndarray, unknown_id: int | None, max_length: int) -> Features:
    """Token count, unknown-token rate and truncation per row of a tokenized batch."""
    # Raw ufunc calls, no ndarray methods: at batch 1 (the device's usual request) numpy's per-call overhead is the cost.
    mask = np.not_equal(attention_mask, 0)
    token_count = np.add.reduce(mask, axis=1).astype(np.float64)
    if unknown_id is None:
        unknown_rate = np.zeros_like(token_count)
    else:
        unknown_rate = np.add.reduce(np.equal(input_ids, unknown_id) & mask, axis=1) / np.maximum(token_count, 1.0)
    return {
        "input.token_count": token_count,
        "input.unknown_rate": unknown_rate,
        "input.truncated": np.greater_equal(token_count, max_length).astype(np.float64),
    }


def image_features(images: np.ndarray) -> Features:
    """Brightness (mean), contrast (std) and per-channel means of raw uint8 images, on the 0-255 scale.

    ``images`` is ``[batch, height, width]`` or ``[batch, height, width, channels]``.
    """
    pixels = np.asarray(images)
    if pixels.ndim == 3:
        pixels = pixels[..., None]
    if pixels.ndim != 4:
        raise ValueError(f"images must be [batch, height, width(, channels)], got shape {list(pixels.shape)}")
    height, width = pixels.shape[1:3]
    stride = max(1, int(np.ceil(np.sqrt(height * width / _IMAGE_SAMPLE_PIXELS))))
    sample = pixels[:, ::stride, ::stride, :] if stride > 1 else pixels
    flat = sample.reshape(sample.shape[0], -1).astype(np.float64)
    count = flat.shape[1]
    # From the sum and the sum of squares: for uint8 pixels both are integers well below 2**53, so exact in float64,
    # and the variance's numerator count * sum(x^2) - sum(x)^2 is exact too (no two-pass rounding, same result at any
    # batch size). Two reductions instead of numpy's mean and std, which cost several times more per call.
    total = np.add.reduce(flat, axis=1)
    squares = np.einsum("ij,ij->i", flat, flat)
    features: Features = {
        "input.brightness": total / count,
        "input.contrast": np.sqrt(np.maximum(count * squares - total * total, 0.0)) / count,
    }
    if pixels.shape[3] > 1:
        channel_means = sample.mean(axis=(1, 2), dtype=np.float64)
        for channel in range(pixels.shape[3]):
            features[f"input.channel_mean.{channel}"] = channel_means[:, channel]
    return features


def tensor_features(tensors: Mapping[str, np.ndarray]) -> Features:
    """Numeric inputs: each value of a small row its own feature (``input.<name>.<i>``); a window of a few channels
    ``[batch, channels, steps]`` (sensor series) each channel's mean and std (``input.<name>.<c>.mean|std``); any
    other row its mean and std."""
    features: Features = {}
    for name, tensor in tensors.items():
        array = np.asarray(tensor)
        if array.dtype.kind not in "biuf" or array.ndim == 0:
            continue
        if array.ndim == 3 and array.shape[1] <= MAX_TENSOR_FEATURES // 2 and array.shape[2] > 1:
            windows = array.astype(np.float64)
            for channel, (mean, std) in enumerate(zip(windows.mean(axis=2).T, windows.std(axis=2).T, strict=True)):
                features[f"input.{name}.{channel}.mean"], features[f"input.{name}.{channel}.std"] = mean, std
            continue
        rows = array.reshape(array.shape[0], -1).astype(np.float64)
        if rows.shape[1] <= MAX_TENSOR_FEATURES:
            for index in range(rows.shape[1]):
                features[f"input.{name}.{index}"] = rows[:, index]
        else:
            features[f"input.{name}.mean"] = rows.mean(axis=1)
            features[f"input.{name}.std"] = rows.std(axis=1)
    return features


def output_features(logits: np.ndarray) -> Features:
    """Predicted class, top-class probability and entropy (nats) of a classifier's logits ``[batch, classes]``."""
    scores = np.asarray(logits, dtype=np.float64)
    scores = scores.reshape(scores.shape[0], -1)
    top = np.maximum.reduce(scores, axis=1, keepdims=True)
    shifted = scores - top
    # exp() of anything below -800 is exactly 0 anyway; clipping keeps a -inf logit's 0 * log 0 term at 0, not NaN.
    np.maximum(shifted, -800.0, out=shifted)
    exponentials = np.exp(shifted)
    total = np.add.reduce(exponentials, axis=1)
    # With p = e / total and log p = shifted - log(total): the top probability is 1 / total (its shifted score is 0)
    # and the entropy -sum(p log p) = log(total) - sum(e * shifted) / total. Fewer numpy calls than the textbook form.
    return {
        "output.predicted_class": scores.argmax(axis=1),
        "output.top_probability": 1.0 / total,
        "output.entropy": np.log(total) - np.einsum("ij,ij->i", exponentials, shifted) / total,
    }
