"""What one inference request may hold, checked before any tensor is decoded or any model runs.

A request that breaks the contract is the client's mistake, answered 400 or 413
with the field and the allowed range, and never reaches ONNX Runtime (whose own
errors are internal text, and a 500). The contract:

- at most ``max_rows`` rows (texts, images, tensor rows); no empty dimension;
- for a text model, sequences of 1 to ``max_length`` tokens (the bundle's);
- integer inputs that index a table (token ids, token type ids) within the
  table: the build records each such range in the manifest (``value_range``),
  and a text bundle's token ids are bounded by its tokenizer's vocabulary too;
- float inputs finite: a NaN would run through the model and come out as an
  answer (an anomaly detector's NaN score reads as "normal").
"""

from __future__ import annotations

import numpy as np

from device_agent.bundle import Manifest, TokenizerPreprocessing
from device_agent.protocol import InferRequest, ProtocolError


def check_rows(request: InferRequest, manifest: Manifest, max_rows: int) -> None:
    """Refuse a request whose tensors hold more rows than ``max_rows``, or none, from the shapes it declares.

    Rows are dimension 0 where the model's is symbolic (a batch); the raw ``text`` and ``image`` inputs always batch.
    """
    fixed = {spec.name for spec in manifest.inputs if spec.shape and isinstance(spec.shape[0], int)}
    for tensor in request.inputs:
        if not tensor.shape:
            continue
        if tensor.shape[0] > max_rows and tensor.name not in fixed:
            raise ProtocolError(
                f"input {tensor.name!r} holds {tensor.shape[0]} rows; the agent takes at most {max_rows} per request "
                "(max_rows_per_request): split it into several requests", 413
            )
        if 0 in tensor.shape:
            raise ProtocolError(f"input {tensor.name!r} has shape {tensor.shape}: an empty dimension; send at least one row and one element")


def check_feeds(manifest: Manifest, feeds: dict[str, np.ndarray], ranges: dict[str, tuple[int, int]]) -> None:
    """Refuse tensors the model cannot take: sequences past max_length, values outside their range (empty ones never get
    here: ``check_rows`` refused them from their declared shapes)."""
    max_length = manifest.preprocessing.max_length if isinstance(manifest.preprocessing, TokenizerPreprocessing) else None
    for name, array in feeds.items():
        if max_length is not None and array.ndim == 2 and array.shape[1] > max_length:
            raise ProtocolError(f"input {name!r} holds sequences of {array.shape[1]} tokens; this model takes 1 to {max_length}")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            where = tuple(int(i) for i in np.argwhere(~np.isfinite(array))[0])
            raise ProtocolError(f"input {name!r} holds {array[where]} at {list(where)}; this model takes finite numbers "
                                "(fill gaps before sending)")
        allowed = ranges.get(name)
        if allowed is None or array.dtype.kind not in "iu":
            continue
        low, high = allowed
        smallest, largest = int(array.min()), int(array.max())
        if smallest < low or largest > high:
            bad = smallest if smallest < low else largest
            where = tuple(int(i) for i in np.argwhere(array == bad)[0])
            raise ProtocolError(f"input {name!r} holds {bad} at {list(where)}; this model takes values from {low} to {high}")


def value_ranges(manifest: Manifest, vocabulary_size: int | None = None) -> dict[str, tuple[int, int]]:
    """Each integer input's allowed values: the manifest's ``value_range``, narrowed by the tokenizer's vocabulary."""
    ranges = {spec.name: (spec.value_range[0], spec.value_range[1]) for spec in manifest.inputs if spec.value_range is not None}
    if vocabulary_size is not None and any(spec.name == "input_ids" for spec in manifest.inputs):
        low, high = ranges.get("input_ids", (0, vocabulary_size - 1))
        ranges["input_ids"] = (max(low, 0), min(high, vocabulary_size - 1))
    return ranges
