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
    mask = np.asarray(attention_mask) != 0
    token_count = mask.sum(axis=1).astype(np.float64)
    if unknown_id is None:
        unknown = np.zeros_like(token_count)
    else:
        unknown = ((np.asarray(input_ids) == unknown_id) & mask).sum(axis=1)
    return {
        "input.token_count": token_count,
        "input.unknown_rate": unknown / np.maximum(token_count, 1.0),
        "input.truncated": (token_count >= max_length).astype(np.float64),
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
    sample = pixels[:, ::stride, ::stride, :].astype(np.float32)
    flat = sample.reshape(sample.shape[0], -1)
    features: Features = {
        "input.brightness": flat.mean(axis=1, dtype=np.float64),
        "input.contrast": flat.std(axis=1, dtype=np.float64),
    }
    if pixels.shape[3] > 1:
        channel_means = sample.mean(axis=(1, 2), dtype=np.float64)
        for channel in range(pixels.shape[3]):
            features[f"input.channel_mean.{channel}"] = channel_means[:, channel]
    return features


def tensor_features(tensors: Mapping[str, np.ndarray]) -> Features:
    """Numeric inputs: each value of a small row its own feature (``input.<name>.<i>``), else the row's mean and std."""
    features: Features = {}
    for name, tensor in tensors.items():
        array = np.asarray(tensor)
        if array.dtype.kind not in "biuf" or array.ndim == 0:
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
    shifted = scores - scores.max(axis=1, keepdims=True)
    exponentials = np.exp(shifted)
    probabilities = exponentials / exponentials.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.sum(np.where(probabilities > 0, probabilities * np.log(probabilities), 0.0), axis=1)
    return {
        "output.predicted_class": probabilities.argmax(axis=1),
        "output.top_probability": probabilities.max(axis=1),
        "output.entropy": entropy,
    }
