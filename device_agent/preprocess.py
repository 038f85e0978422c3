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
        self._tokenizer.enable_truncation(max_length)
        pad_id = self._tokenizer.token_to_id("[PAD]") or 0
        self._tokenizer.enable_padding(pad_id=pad_id, pad_token="[PAD]", length=max_length if pad_to_max_length else None)

    def encode(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        encodings = self._tokenizer.encode_batch(list(texts))
        return {
            "input_ids": np.asarray([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.asarray([e.attention_mask for e in encodings], dtype=np.int64),
            "token_type_ids": np.asarray([e.type_ids for e in encodings], dtype=np.int64),
        }
