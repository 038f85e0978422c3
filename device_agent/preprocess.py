"""Preprocessing from a bundle's spec, one implementation for the build and the device.

Text: a Hugging Face ``tokenizer.json`` (the ``tokenizers`` library, no
transformers) padded to the batch's longest row and truncated to max_length,
giving the int64 ``input_ids``, ``attention_mask`` and ``token_type_ids`` a BERT
encoder takes. The build computes golden vectors and calibration inputs with
this class, so a device tokenizes exactly as the build did.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

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
        if images.dtype != np.uint8 or images.ndim != 4:
            raise UserError(f"images must be uint8 [batch, height, width, channels], got {images.dtype} {list(images.shape)}")
        wanted_channels = 1 if self.spec.channel_order == "L" else 3
        if images.shape[3] != wanted_channels:
            raise UserError(f"images have {images.shape[3]} channels; this model takes {wanted_channels} ({self.spec.channel_order})")
        pixels = images.astype(np.float32)
        if self.spec.resize is not None:
            pixels = _resize_shorter_side(pixels, self.spec.resize)
        pixels = _centre_crop(pixels, *self.spec.crop)
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
