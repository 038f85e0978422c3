"""Preprocessing from a bundle's spec, one implementation for the build and the device.

Text: a Hugging Face ``tokenizer.json`` (the ``tokenizers`` library, no
transformers) padded to the batch's longest row and truncated to max_length,
giving the int64 ``input_ids``, ``attention_mask`` and ``token_type_ids`` a BERT
encoder takes. The build computes golden vectors and calibration inputs with
this class, so a device tokenizes exactly as the build did.

Images: ``ImagePreprocessor`` (resize, centre crop, scale, normalise, layout).
Tables: ``TableEncoder`` (raw rows as column → value objects; missing numbers
filled, categories one-hot with an "other" slot), and ``category_key``, the one
way a categorical value is named on both sides.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.errors import UserError


class TextTokenizer:
    """Turns strings into the integer tensors of a BERT-style encoder."""

    def __init__(self, tokenizer_file: Path, max_length: int, *, pad_to_max_length: bool = False) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise UserError("text models need the tokenizers package: pip install edgekit[agent]") from None
        try:
            self._tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # tokenizers raises a bare Exception for unreadable files
            raise UserError(f"{tokenizer_file} is not a tokenizers JSON file ({exc})") from None
        self.max_length = max_length
        # The drift features count unknown tokens (device_agent.features.text_features). BERT vocabularies say [UNK] and
        # [PAD], RoBERTa's <unk> and <pad>; the tokenizer file's own model and padding settings say which, where they do.
        unknown = getattr(self._tokenizer.model, "unk_token", None)
        self.unknown_id: int | None = self._first_known(unknown, "[UNK]", "<unk>")
        self.vocabulary_size: int = self._tokenizer.get_vocab_size()
        self._tokenizer.enable_truncation(max_length)
        padding = self._tokenizer.padding or {}
        pad_token = next((t for t in (padding.get("pad_token"), "[PAD]", "<pad>") if t and self._tokenizer.token_to_id(t) is not None), None)
        pad_id = self._tokenizer.token_to_id(pad_token) if pad_token else 0
        self.pad_id: int = pad_id
        self._tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token or "[PAD]", length=max_length if pad_to_max_length else None)

    def _first_known(self, *tokens: str | None) -> int | None:
        """The id of the first of ``tokens`` the vocabulary has."""
        for token in tokens:
            if token and (found := self._tokenizer.token_to_id(token)) is not None:
                return found
        return None

    def encode(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        encodings = self._tokenizer.encode_batch(list(texts))
        return {
            "input_ids": np.asarray([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.asarray([e.attention_mask for e in encodings], dtype=np.int64),
            "token_type_ids": np.asarray([e.type_ids for e in encodings], dtype=np.int64),
        }

    def piece_spans(self, text: str) -> list[tuple[int, int] | None]:
        """For each position of ``encode([text])``'s row, the character span of ``text`` its word piece came from, or
        None for a special token ([CLS], [SEP])."""
        encoding = self._tokenizer.encode(text)
        return [None if special else (start, end)
                for (start, end), special in zip(encoding.offsets, encoding.special_tokens_mask)]

    def read_spans(self, text: str) -> list[tuple[int, int]]:
        """The character spans of ``text`` that the model reads: one per word piece, special tokens left out, none past
        the ``max_length`` cut."""
        return [span for span in self.piece_spans(text) if span is not None and span[1] > span[0]]


class ImagePreprocessor:
    """Turns raw uint8 images (``[batch, height, width, channels]``) into the model's float input.

    Steps, as the bundle's ``ImagePreprocessing`` spec says: resize so the
    shorter side is ``resize`` (bilinear), centre-crop to ``crop``, reorder
    channels, scale, normalise with mean/std, and lay out as NCHW or NHWC. numpy
    only, so a device needs no imaging library.
    """

    def __init__(self, spec) -> None:  # spec: device_agent.bundle.ImagePreprocessing
        self.spec = spec

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.normalise(self.geometry(images))

    def geometry(self, images: np.ndarray) -> np.ndarray:
        """The first half: resize and crop to the model's size, as float pixels ``[batch, height, width, channels]``
        (what the model sees, before scaling; explanations occlude these)."""
        if images.dtype != np.uint8 or images.ndim != 4:
            raise UserError(f"images must be uint8 [batch, height, width, channels], got {images.dtype} {list(images.shape)}")
        wanted_channels = 1 if self.spec.channel_order == "L" else 3
        if images.shape[3] != wanted_channels:
            raise UserError(f"images have {images.shape[3]} channels; this model takes {wanted_channels} ({self.spec.channel_order})")
        pixels = images.astype(np.float32)
        if self.spec.resize is not None:
            pixels = _resize_shorter_side(pixels, self.spec.resize)
        return _centre_crop(pixels, *self.spec.crop)

    def neutral_pixel(self) -> np.ndarray | None:
        """The pixel value per channel that normalises to zero (the training mean), or None without normalisation."""
        if not self.spec.mean:
            return None
        neutral = np.asarray(self.spec.mean, np.float32) / np.float32(self.spec.scale)
        return neutral[::-1].copy() if self.spec.channel_order == "BGR" else neutral

    def normalise(self, pixels: np.ndarray) -> np.ndarray:
        """The second half: channel order, scale, mean/std and layout of ``geometry``'s float pixels."""
        if self.spec.channel_order == "BGR":
            pixels = pixels[..., ::-1]
        pixels = pixels * self.spec.scale
        if self.spec.mean:
            pixels = (pixels - np.asarray(self.spec.mean, np.float32)) / np.asarray(self.spec.std or [1.0] * len(self.spec.mean), np.float32)
        if self.spec.layout == "NCHW":
            pixels = pixels.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(pixels, dtype=np.float32)


def _resize_shorter_side(pixels: np.ndarray, size: int) -> np.ndarray:
    height, width = pixels.shape[1:3]
    scale = size / min(height, width)
    new_height, new_width = max(1, round(height * scale)), max(1, round(width * scale))
    if (new_height, new_width) == (height, width):
        return pixels
    # Bilinear sampling at pixel centres (the convention of PIL and OpenCV).
    rows = np.clip((np.arange(new_height) + 0.5) / scale - 0.5, 0, height - 1)
    cols = np.clip((np.arange(new_width) + 0.5) / scale - 0.5, 0, width - 1)
    top, left = np.floor(rows).astype(int), np.floor(cols).astype(int)
    bottom, right = np.minimum(top + 1, height - 1), np.minimum(left + 1, width - 1)
    dy, dx = (rows - top)[None, :, None, None], (cols - left)[None, None, :, None]
    upper = pixels[:, top][:, :, left] * (1 - dx) + pixels[:, top][:, :, right] * dx
    lower = pixels[:, bottom][:, :, left] * (1 - dx) + pixels[:, bottom][:, :, right] * dx
    return upper * (1 - dy) + lower * dy


def _centre_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    have_height, have_width = pixels.shape[1:3]
    if have_height < height or have_width < width:
        raise UserError(f"images of {have_height}x{have_width} are smaller than the model's {height}x{width} crop; send larger images")
    top, left = (have_height - height) // 2, (have_width - width) // 2
    return pixels[:, top:top + height, left:left + width]


# --------------------------------------------------------------------------- tables


def category_key(value: Any) -> str | None:
    """The name a raw categorical value is known by, the same for a CSV cell and a JSON value; None when missing.

    Integral numbers lose their ``.0`` (a CSV column of codes read as floats because one cell is empty says ``3.0``,
    a JSON client sends ``3``); booleans are ``true``/``false`` as in JSON.
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    return str(value)


_FLOAT32_MAX = float(np.finfo(np.float32).max)  # the model's features are FP32: a larger number would become infinite


class TableEncoder:
    """Raw table rows → the model's FP32 feature rows, as a bundle's ``TablePreprocessing`` says.

    A numeric column gives its value, or its ``fill`` (the training median) when the value is missing (null, absent,
    NaN); a categorical column gives one-hot features over its training categories plus one for any other or missing
    value. Normalisation is inside the model. A column the bundle does not know, a numeric value that is not a finite
    number, or a row that is not an object is a UserError naming the row and the column.
    """

    def __init__(self, spec) -> None:  # spec: device_agent.bundle.TablePreprocessing
        self.columns = list(spec.columns)
        self.width = spec.width
        self._known = {column.name for column in self.columns}
        self._ignored = set(spec.ignored)  # columns a raw row may carry that the model does not read (ids, the label)
        self._slots: list[tuple[str, int, dict[str, int] | None, float | None]] = []
        offset = 0
        for column in self.columns:
            index = {name: i for i, name in enumerate(column.categories)} if column.kind == "categorical" else None
            self._slots.append((column.name, offset, index, column.fill))
            offset += column.width

    def __call__(self, rows: Sequence[Any]) -> np.ndarray:
        features = np.zeros((len(rows), self.width), dtype=np.float32)
        for number, row in enumerate(rows):
            if not isinstance(row, Mapping):
                raise UserError(f"row {number} is {type(row).__name__}, not an object of column name → value")
            unknown = [name for name in row if name not in self._known and name not in self._ignored]
            if unknown:
                raise UserError(f"row {number}: unknown column(s) {', '.join(map(repr, unknown[:5]))}; "
                                f"the model's columns: {', '.join(c.name for c in self.columns[:20])}"
                                f"{' …' if len(self.columns) > 20 else ''}")
            for name, offset, index, fill in self._slots:
                value = row.get(name)
                if index is None:
                    features[number, offset] = _numeric(value, fill, number, name)
                else:
                    if isinstance(value, (Mapping, list, tuple)):
                        raise UserError(f"row {number}, column {name!r}: a category is a string, number or boolean, "
                                        f"not {type(value).__name__}")
                    key = category_key(value)
                    features[number, offset + index.get(key, len(index)) if key is not None else offset + len(index)] = 1.0
        return features


def _numeric(value: Any, fill: float | None, row: int, column: str) -> float:
    if value is None:
        return float(fill or 0.0)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise UserError(f"row {row}, column {column!r}: {str(value)[:40]!r} is not a number (send a number, or null "
                        "when it is missing)")
    try:
        number = float(value)
    except OverflowError:  # a JSON integer past a double's range
        raise UserError(f"row {row}, column {column!r}: {str(value)[:40]}… is too large for a number") from None
    if math.isnan(number):
        return float(fill or 0.0)
    if not math.isfinite(number) or abs(number) > _FLOAT32_MAX:
        raise UserError(f"row {row}, column {column!r}: {number} is not a finite number the model can hold "
                        f"(at most {_FLOAT32_MAX:.3g} in size)")
    return number


# --------------------------------------------------------------------------- spectral features of windows


def spectral_features(series: np.ndarray, bands: int) -> np.ndarray:
    """Per channel of each window ``[n, channels, steps]``: mean, std, RMS, skewness, kurtosis (excess), then the
    log energy of ``bands`` equal-width frequency bands of its spectrum (DC excluded), as FP32 ``[n, channels * (5 +
    bands)]``, channel by channel. A constant channel has skewness and kurtosis 0."""
    values = np.asarray(series, dtype=np.float64)
    if values.ndim != 3:
        raise UserError(f"windows must be [batch, channels, steps]; got {list(values.shape)}")
    if not np.all(np.isfinite(values)):
        raise UserError("windows hold NaN or infinite values; send finite numbers (fill gaps before sending)")
    mean = values.mean(axis=-1)
    centred = values - mean[..., None]
    variance = (centred ** 2).mean(axis=-1)
    std = np.sqrt(variance)
    safe = np.where(std > 1e-12, std, 1.0)
    skewness = np.where(std > 1e-12, (centred ** 3).mean(axis=-1) / safe ** 3, 0.0)
    kurtosis = np.where(std > 1e-12, (centred ** 4).mean(axis=-1) / safe ** 4 - 3.0, 0.0)
    rms = np.sqrt((values ** 2).mean(axis=-1))
    power = np.abs(np.fft.rfft(centred, axis=-1)[..., 1:]) ** 2 / values.shape[-1]
    edges = np.linspace(0, power.shape[-1], bands + 1).round().astype(int)
    energy = np.stack([power[..., a:b].sum(axis=-1) for a, b in zip(edges, edges[1:])], axis=-1)
    per_channel = np.concatenate([np.stack([mean, std, rms, skewness, kurtosis], axis=-1), np.log1p(energy)], axis=-1)
    return per_channel.reshape(len(values), -1).astype(np.float32)
