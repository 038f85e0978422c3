"""Inference requests in the binary tensor extension, built by hand: for the hostile-input tests and bench."""

from __future__ import annotations

import json
import struct

import numpy as np

_BINARY = "application/octet-stream"


def _binary_request(inputs: list[dict], blob: bytes) -> tuple[bytes, dict[str, str]]:
    header = json.dumps({"inputs": inputs}).encode()
    return header + blob, {"Inference-Header-Content-Length": str(len(header)), "Content-Type": _BINARY}


def texts_request(texts: list[bytes]) -> tuple[bytes, dict[str, str]]:
    """The body and headers of a request of raw texts (BYTES ``text``, each 4-byte length-prefixed)."""
    blob = b"".join(struct.pack("<I", len(text)) + text for text in texts)
    return _binary_request([{"name": "text", "shape": [len(texts)], "datatype": "BYTES",
                             "parameters": {"binary_data_size": len(blob)}}], blob)


def tokens_request(input_ids: np.ndarray, type_ids: np.ndarray | None = None) -> tuple[bytes, dict[str, str]]:
    """The body and headers of a request of token tensors (INT64 [rows, sequence]); the mask all ones."""
    tensors = {"input_ids": input_ids, "attention_mask": np.ones_like(input_ids),
               "token_type_ids": np.zeros_like(input_ids) if type_ids is None else type_ids}
    inputs = [{"name": name, "shape": list(value.shape), "datatype": "INT64", "parameters": {"binary_data_size": value.nbytes}}
              for name, value in tensors.items()]
    return _binary_request(inputs, b"".join(value.astype("<i8").tobytes() for value in tensors.values()))
