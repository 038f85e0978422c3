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

Table features are computed from the encoded feature row (``TableEncoder``), so
raw rows and a raw ``features`` tensor give the same values: per numeric column
its value after fill (``input.column.<name>``, numeric), per categorical column
the index of its category, ``len(categories)`` for "other"
(``input.category.<name>``, categorical). Column names are made into feature
names by :func:`table_layout`, the one place that does it. A table keeps at most
``MAX_TABLE_FEATURES`` columns (the contract's ``MAX_FEATURES`` less the output
features); the columns past it, the last ones, have no drift feature.

A spectral bundle's input features are ``tensor_features`` of its raw windows (the ``series`` input, per channel mean
and std, as for a plain time-series bundle), not of the spectral features the model takes: a request that sends the
``features`` tensor itself gives output features only.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from device_agent.telemetry_schema import MAX_FEATURES, escape_unprintable

if TYPE_CHECKING:
    from device_agent.bundle import TableColumn, TablePreprocessing

log = logging.getLogger("edgekit.agent.features")

CATEGORICAL = frozenset({"output.predicted_class"})
OUTPUT_FEATURES = ("output.predicted_class", "output.top_probability", "output.entropy")
TABLE_NUMERIC_PREFIX = "input.column."
TABLE_CATEGORY_PREFIX = "input.category."
MAX_TABLE_FEATURES = MAX_FEATURES - len(OUTPUT_FEATURES)
OTHER_CATEGORY = "other"
# telemetry_schema.FeatureName: ^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$ (every table feature name starts with "input.").
_FEATURE_NAME_CHARS = 128
_NOT_IN_FEATURE_NAMES = re.compile(r"[^A-Za-z0-9._:-]")
_CATEGORY_NAME_CHARS = 256  # telemetry_schema.FeatureReference.categories
# Larger images are sampled on a regular grid of about this many pixels: the
# statistics barely move and the cost per request stays flat.
_IMAGE_SAMPLE_PIXELS = 4096
# A numeric tensor with more values per row than this is summarised (mean, std) rather than one feature each.
MAX_TENSOR_FEATURES = 16

Features = dict[str, np.ndarray]


def is_categorical(name: str) -> bool:
    """Whether a feature's values are category indices: the predicted class, a table's categorical columns."""
    return name in CATEGORICAL or name.startswith(TABLE_CATEGORY_PREFIX)


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
    ``[batch, channels, steps]`` (sensor series) each channel's mean, std and spectral centroid
    (``input.<name>.<c>.mean|std|centroid``: where the channel's energy lies in frequency, 0 at DC to 1 at Nyquist, so a
    machine running at another speed shows even when its level and spread do not change); any other row its mean
    and std."""
    features: Features = {}
    for name, tensor in tensors.items():
        array = np.asarray(tensor)
        if array.dtype.kind not in "biuf" or array.ndim == 0:
            continue
        if array.ndim == 3 and array.shape[1] <= MAX_TENSOR_FEATURES // 2 and array.shape[2] > 1:
            windows = array.astype(np.float64)
            centroids = _spectral_centroids(windows)
            for channel, (mean, std) in enumerate(zip(windows.mean(axis=2).T, windows.std(axis=2).T, strict=True)):
                features[f"input.{name}.{channel}.mean"], features[f"input.{name}.{channel}.std"] = mean, std
                features[f"input.{name}.{channel}.centroid"] = centroids[:, channel]
            continue
        rows = array.reshape(array.shape[0], -1).astype(np.float64)
        if rows.shape[1] <= MAX_TENSOR_FEATURES:
            for index in range(rows.shape[1]):
                features[f"input.{name}.{index}"] = rows[:, index]
        else:
            features[f"input.{name}.mean"] = rows.mean(axis=1)
            features[f"input.{name}.std"] = rows.std(axis=1)
    return features


def _spectral_centroids(windows: np.ndarray) -> np.ndarray:
    """Per window and channel, the power-weighted mean frequency of the centred signal, 0 (DC) to 1 (Nyquist); 0 for a
    constant channel."""
    power = np.abs(np.fft.rfft(windows - windows.mean(axis=2, keepdims=True), axis=2)) ** 2
    frequencies = np.linspace(0.0, 1.0, power.shape[2])
    total = power.sum(axis=2)
    return np.where(total > 0, (power * frequencies).sum(axis=2) / np.where(total > 0, total, 1.0), 0.0)


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


# --------------------------------------------------------------------------- tables


@dataclass(frozen=True)
class TableLayout:
    """A table's drift features: per kept column its feature name and where its values start in an encoded row.

    ``categories`` maps each categorical feature to its reference category names (the training categories, printable
    and at most 256 characters, then the "other" bin); ``dropped`` names the columns past ``MAX_TABLE_FEATURES``.
    """

    spec: TablePreprocessing
    names: tuple[str, ...]
    offsets: tuple[int, ...]
    categories: Mapping[str, list[str]]
    dropped: tuple[str, ...]


def table_layout(spec: TablePreprocessing) -> TableLayout:
    """The drift features of a ``TablePreprocessing``; make it once per model (it logs the columns it leaves out)."""
    columns = list(spec.columns)
    kept, dropped = columns[:MAX_TABLE_FEATURES], tuple(column.name for column in columns[MAX_TABLE_FEATURES:])
    if dropped:
        log.warning("a table of %d columns: drift is watched on the first %d; %d columns have no drift feature",
                    len(columns), MAX_TABLE_FEATURES, len(dropped), extra={"dropped": list(dropped[:20])})
    names = table_feature_names(kept)
    offsets, offset = [], 0
    for column in kept:
        offsets.append(offset)
        offset += column.width
    categories = {name: reference_categories(column.categories) for name, column in zip(names, kept)
                  if column.kind == "categorical"}
    return TableLayout(spec, tuple(names), tuple(offsets), categories, dropped)


def table_feature_names(columns: Sequence[TableColumn]) -> list[str]:
    """Each column's feature name: ``input.column.<name>`` (numeric) or ``input.category.<name>`` (categorical), the name
    with every character a feature name may not hold made ``_`` and cut to fit 128 characters; a name an earlier column
    already took gets ``:2``, ``:3``, ... (so the same columns in the same order always get the same names)."""
    taken: set[str] = set()
    names = []
    for column in columns:
        prefix = TABLE_NUMERIC_PREFIX if column.kind == "numeric" else TABLE_CATEGORY_PREFIX
        base = prefix + _NOT_IN_FEATURE_NAMES.sub("_", column.name)
        name, number = base[:_FEATURE_NAME_CHARS], 1
        while name in taken:
            number += 1
            suffix = f":{number}"
            name = base[:_FEATURE_NAME_CHARS - len(suffix)] + suffix
        taken.add(name)
        names.append(name)
    return names


def reference_categories(categories: Sequence[str]) -> list[str]:
    """A categorical column's bins in the drift reference: its categories, shown safely (unprintable characters escaped,
    cut to 256), then "other" (``(other)`` and so on when a category already has that name)."""
    shown = [escape_unprintable(category)[:_CATEGORY_NAME_CHARS] for category in categories]
    other = OTHER_CATEGORY
    while other in shown:
        other = f"({other})"
    return [*shown, other]


def table_features(rows_or_features: Sequence[Mapping[str, Any]] | np.ndarray, table: TablePreprocessing | TableLayout) -> Features:
    """Drift features of a batch of table rows: raw rows (column → value objects) or their encoded FP32 rows
    ``[batch, width]``; ``table`` is the ``TablePreprocessing`` or, on a hot path, its ``table_layout``.

    A categorical column reads its one-hot block: the index of its largest value, or "other" when no value in the block
    is positive (an encoded row sent as a tensor need not be one-hot).
    """
    layout = table if isinstance(table, TableLayout) else table_layout(table)
    if isinstance(rows_or_features, np.ndarray) and rows_or_features.dtype != object:
        encoded = rows_or_features
    else:  # rows: a list, or an object array of dicts (edgekit.data.Split's table rows)
        from device_agent.preprocess import TableEncoder

        encoded = TableEncoder(layout.spec)(rows_or_features)
    if encoded.ndim != 2 or encoded.shape[1] != layout.spec.width:
        raise ValueError(f"encoded table rows must be [batch, {layout.spec.width}], got shape {list(encoded.shape)}")
    features: Features = {}
    for name, offset in zip(layout.names, layout.offsets):
        bins = layout.categories.get(name)
        if bins is None:
            features[name] = encoded[:, offset].astype(np.float64)
            continue
        block = encoded[:, offset:offset + len(bins)]
        index = block.argmax(axis=1)
        index[~(block.max(axis=1) > 0)] = len(bins) - 1
        features[name] = index
    return features
