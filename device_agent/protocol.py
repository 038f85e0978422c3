"""Open Inference Protocol (KServe v2) inference over HTTP: request decoding and response encoding.

Pure functions over bytes, pydantic models and numpy, with no web framework,
so the server's routes stay about routing. Covers JSON tensors (flat or
nested ``data``), the binary tensor data extension (``Inference-Header-Content-Length``,
``binary_data_size``, 4-byte length-prefixed BYTES elements), request bodies
compressed with gzip or deflate (tritonclient's ``request_compression_algorithm``),
and the classification extension (top-K as ``"score:index:label"``).

Everything a client can get wrong raises :class:`ProtocolError` with the HTTP
status to answer (400, 413 or 415) and a message that names the tensor and
what the model expects.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, JsonValue, NonNegativeInt, ValidationError

from device_agent.bundle import Manifest, TensorSpec
from device_agent.errors import UserError
from device_agent.runtime import NUMPY_DTYPES

HEADER_LENGTH = "Inference-Header-Content-Length"
_LENGTH_PREFIX = struct.Struct("<I")


class ProtocolError(UserError):
    """A request the server refuses; ``status_code`` is the HTTP status to answer with."""

    def __init__(self, message: str, status_code: int = 400) -> None:
        self.status_code = status_code
        super().__init__(message)


# --------------------------------------------------------------------------- request schema (also the OpenAPI schema)


class _Strict(BaseModel):
    # Unknown keys are refused: a misspelt "datatyp" must not be silently ignored.
    model_config = ConfigDict(extra="forbid")


class RequestInput(_Strict):
    name: str
    shape: list[NonNegativeInt]
    datatype: str
    parameters: dict[str, JsonValue] | None = None
    data: list[JsonValue] | None = Field(None, description="row-major, flat or nested; absent for binary inputs")


class RequestOutput(_Strict):
    name: str
    parameters: dict[str, JsonValue] | None = None


class InferRequest(_Strict):
    id: str | None = None
    parameters: dict[str, JsonValue] | None = None
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


def parse_json_model(document: bytes, model: type[BaseModel], what: str) -> BaseModel:
    """Validate JSON bytes as ``model``; every problem becomes one ProtocolError."""
    try:
        return model.model_validate_json(document)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        if any(error["type"] == "json_invalid" for error in errors):
            raise ProtocolError(f"{what} is not valid JSON") from None
        problems = [f"{'.'.join(str(part) for part in error['loc']) or '(top level)'}: {error['msg']}" for error in errors[:5]]
        raise ProtocolError(f"{what} does not match the protocol: {'; '.join(problems)}") from None
    except RecursionError:
        raise ProtocolError(f"{what} is nested too deeply") from None


# --------------------------------------------------------------------------- body framing


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Undo ``Content-Encoding`` (gzip or deflate), refusing output over ``limit`` bytes (decompression bombs)."""
    encoding = (encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding == "gzip":
        candidates = [zlib.MAX_WBITS | 16]
    elif encoding == "deflate":
        # HTTP's "deflate" is the zlib format; some clients send raw deflate.
        candidates = [zlib.MAX_WBITS, -zlib.MAX_WBITS]
    else:
        raise ProtocolError(f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or none", 415)
    for wbits in candidates:
        inflater = zlib.decompressobj(wbits)
        try:
            data = inflater.decompress(body, limit + 1)
        except zlib.error:
            continue
        if len(data) > limit or inflater.unconsumed_tail:
            raise ProtocolError(f"the decompressed request is over the {limit}-byte limit", 413)
        if not inflater.eof:
            raise ProtocolError(f"the {encoding} request body is truncated")
        return data
    raise ProtocolError(f"the request body is not valid {encoding} data")


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """The JSON header and the binary tensors after it (empty when the body is all JSON)."""
    if header_length is None:
        return body, b""
    try:
        length = int(header_length)
    except ValueError:
        raise ProtocolError(f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
    if not 0 <= length <= len(body):
        raise ProtocolError(f"{HEADER_LENGTH} is {length}, but the body has {len(body)} bytes")
    return body[:length], body[length:]


def parse_infer_request(body: bytes, header_length: str | None, max_json_bytes: int | None = None) -> tuple[InferRequest, bytes]:
    """The request's JSON header, parsed, and its binary tensors; 413 for JSON over ``max_json_bytes``."""
    header, binary = split_body(body, header_length)
    if max_json_bytes is not None and len(header) > max_json_bytes:
        # Parsing JSON holds the interpreter lock for ~10 ms per MiB on the build VM; the binary extension has no such cost.
        raise ProtocolError(f"the request's JSON is {len(header)} bytes, over the {max_json_bytes}-byte limit "
                            "(max_json_bytes): send large tensors with the binary tensor extension", 413)
    request = parse_json_model(header, InferRequest, "the inference request")
    binary_inputs = [tensor.name for tensor in request.inputs if _binary_size(tensor) is not None]
    if binary_inputs and header_length is None:
        raise ProtocolError(
            f"inputs {binary_inputs} are binary (binary_data_size), but the {HEADER_LENGTH} header is missing"
        )
    return request, binary


# --------------------------------------------------------------------------- inputs


def _parameter(parameters: dict[str, JsonValue] | None, name: str, kind: type, where: str):
    value = (parameters or {}).get(name)
    if value is None:
        return None
    # bool is an int in Python; the protocol keeps them apart.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(f"{where}: parameter {name!r} must be {'a boolean' if kind is bool else 'an integer'}, got {value!r}")
    return value


def _binary_size(tensor: RequestInput) -> int | None:
    size = _parameter(tensor.parameters, "binary_data_size", int, f"input {tensor.name!r}")
    if size is not None and size < 0:
        raise ProtocolError(f"input {tensor.name!r}: binary_data_size must not be negative, got {size}")
    return size


def _numpy_dtype(spec: TensorSpec) -> np.dtype:
    dtype = NUMPY_DTYPES.get(spec.datatype)
    if dtype is None and spec.datatype != "BYTES":
        raise ProtocolError(f"input {spec.name!r} is {spec.datatype}, which this agent cannot take over HTTP yet")
    return dtype if dtype is not None else np.dtype(object)


# ONNX Runtime's dimensions are int64; numpy refuses far less than that for an empty
# tensor's shape. No real request comes near this.
_MAX_DIMENSION = 2**31 - 1


def _check_shape(tensor: RequestInput, spec: TensorSpec, bound: dict[str, tuple[int, str]]) -> None:
    """Fixed dimensions must match; a symbolic dimension takes one value across all inputs."""
    expected = "[" + ", ".join(str(dim) for dim in spec.shape) + "]"
    if any(dim > _MAX_DIMENSION for dim in tensor.shape):
        raise ProtocolError(f"input {tensor.name!r} has shape {tensor.shape}; dimensions above {_MAX_DIMENSION} are refused")
    if len(tensor.shape) != len(spec.shape):
        raise ProtocolError(f"input {tensor.name!r} has shape {tensor.shape}; the model takes {expected}")
    for got, want in zip(tensor.shape, spec.shape):
        if isinstance(want, int) and got != want:
            raise ProtocolError(f"input {tensor.name!r} has shape {tensor.shape}; the model takes {expected}")
        if isinstance(want, str):
            earlier, where = bound.setdefault(want, (got, tensor.name))
            if earlier != got:
                raise ProtocolError(
                    f"dimension {want!r} is {earlier} in input {where!r} but {got} in input {tensor.name!r}"
                )


def _bytes_elements(blob: bytes, count: int, name: str) -> np.ndarray:
    """BYTES in the binary extension: each element is a 4-byte little-endian length, then the bytes."""
    elements, offset = [], 0
    while offset < len(blob):
        if offset + 4 > len(blob):
            raise ProtocolError(f"input {name!r}: a BYTES element's length prefix is cut off")
        (length,) = _LENGTH_PREFIX.unpack_from(blob, offset)
        offset += 4
        if offset + length > len(blob):
            raise ProtocolError(f"input {name!r}: a BYTES element claims {length} bytes past the end of its data")
        elements.append(blob[offset:offset + length])
        offset += length
    if len(elements) != count:
        raise ProtocolError(f"input {name!r} holds {len(elements)} BYTES elements; its shape needs {count}")
    array = np.empty(count, dtype=object)
    array[:] = elements
    return array


def _from_binary(tensor: RequestInput, spec: TensorSpec, blob: bytes, count: int) -> np.ndarray:
    dtype = _numpy_dtype(spec)
    if spec.datatype == "BYTES":
        return _bytes_elements(blob, count, tensor.name).reshape(tensor.shape)
    if len(blob) != count * dtype.itemsize:
        raise ProtocolError(
            f"input {tensor.name!r}: binary_data_size is {len(blob)} bytes; shape {tensor.shape} of "
            f"{spec.datatype} needs {count * dtype.itemsize}"
        )
    if spec.datatype == "BOOL":
        return (np.frombuffer(blob, dtype=np.uint8) != 0).reshape(tensor.shape)
    return np.frombuffer(blob, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False).reshape(tensor.shape)


_ACCEPTED_KINDS = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}


def _from_json(tensor: RequestInput, spec: TensorSpec, data: list, count: int) -> np.ndarray:
    dtype = _numpy_dtype(spec)
    if spec.datatype == "BYTES":
        return _bytes_from_json(tensor, data, count)
    try:
        values = np.array(data)
    except (ValueError, TypeError, RecursionError):
        raise ProtocolError(f"input {tensor.name!r}: data must be a flat or regularly nested list of numbers") from None
    if values.size != count:
        raise ProtocolError(f"input {tensor.name!r} has {values.size} values; shape {tensor.shape} needs {count}")
    if values.size and values.dtype.kind not in _ACCEPTED_KINDS[dtype.kind]:
        wanted = {"b": "booleans", "i": "integers", "u": "integers", "f": "numbers"}[dtype.kind]
        raise ProtocolError(f"input {tensor.name!r} is {spec.datatype}: its data must be {wanted}")
    if values.size and dtype.kind in "iu":
        limits = np.iinfo(dtype)
        if values.min() < limits.min or values.max() > limits.max:
            raise ProtocolError(f"input {tensor.name!r}: values must lie in [{limits.min}, {limits.max}] for {spec.datatype}")
    with np.errstate(over="ignore"):  # a float too large for FP16 becomes inf, as the client's cast would
        return values.astype(dtype).reshape(tensor.shape)


def flat_json(data: list) -> list:
    """JSON ``data``, flat or nested lists (row-major, as the protocol allows), as one flat list; other values (strings,
    objects) stay whole. Iterative: a deeply nested list cannot exhaust the stack."""
    flat, stack = [], [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _bytes_from_json(tensor: RequestInput, data: list, count: int) -> np.ndarray:
    flat = []
    for item in flat_json(data):
        if not isinstance(item, str):
            raise ProtocolError(f"input {tensor.name!r} is BYTES: its JSON data must be strings")
        flat.append(item.encode("utf-8"))
    if len(flat) != count:
        raise ProtocolError(f"input {tensor.name!r} has {len(flat)} values; shape {tensor.shape} needs {count}")
    array = np.empty(count, dtype=object)
    array[:] = flat
    return array.reshape(tensor.shape)


# How the errors of _claim_tensor word each kind: what the model does with it, what the request did twice.
_CLAIM_VERBS = {"input": ("takes", "given"), "output": ("gives", "requested")}


def _claim_tensor(kind: Literal["input", "output"], name: str, specs: dict[str, TensorSpec], seen: set[str]) -> TensorSpec:
    """The manifest's spec of the request's ``kind`` tensor ``name``, which is added to ``seen``.

    Raises ProtocolError for a name the model does not have, and for one the request already named.
    """
    model_verb, request_verb = _CLAIM_VERBS[kind]
    spec = specs.get(name)
    if spec is None:
        raise ProtocolError(f"unknown {kind} {name!r}; the model {model_verb} {sorted(specs)}")
    if name in seen:
        raise ProtocolError(f"{kind} {name!r} is {request_verb} twice")
    seen.add(name)
    return spec


def decode_inputs(request: InferRequest, binary: bytes, manifest: Manifest) -> dict[str, np.ndarray]:
    """The request's tensors as numpy arrays of the manifest's datatypes, each checked against the manifest."""
    specs = {spec.name: spec for spec in manifest.inputs}
    seen: set[str] = set()
    bound: dict[str, tuple[int, str]] = {}
    feeds, offset = {}, 0
    for tensor in request.inputs:
        spec = _claim_tensor("input", tensor.name, specs, seen)
        if tensor.datatype != spec.datatype:
            raise ProtocolError(f"input {tensor.name!r} is {tensor.datatype}; the model takes {spec.datatype}")
        _check_shape(tensor, spec, bound)
        count = math.prod(tensor.shape)
        size = _binary_size(tensor)
        if size is not None and tensor.data is not None:
            raise ProtocolError(f"input {tensor.name!r} has both data and binary_data_size; send one")
        if size is None and tensor.data is None:
            raise ProtocolError(f"input {tensor.name!r} has no data and no binary_data_size")
        if size is not None:
            if offset + size > len(binary):
                raise ProtocolError(
                    f"input {tensor.name!r}: binary_data_size {size} runs past the end of the body "
                    f"({len(binary) - offset} bytes left)"
                )
            feeds[tensor.name] = _from_binary(tensor, spec, binary[offset:offset + size], count)
            offset += size
        else:
            feeds[tensor.name] = _from_json(tensor, spec, tensor.data, count)
    if offset != len(binary):
        raise ProtocolError(f"the body has {len(binary) - offset} bytes after the binary inputs' binary_data_size")
    missing = sorted(set(specs) - seen)
    if missing:
        raise ProtocolError(f"missing inputs {missing}; the model takes {sorted(specs)}")
    return feeds


# --------------------------------------------------------------------------- outputs


@dataclass(frozen=True)
class OutputChoice:
    """One output the client wants, and how: raw or top-K classes, JSON or binary."""

    name: str
    binary: bool
    classes: int = 0  # 0: the tensor itself; K > 0: the top K classes


def choose_outputs(request: InferRequest, manifest: Manifest) -> list[OutputChoice]:
    """Which outputs to return and how; with no ``outputs`` in the request, all of them."""
    specs = {spec.name: spec for spec in manifest.outputs}
    binary_default = bool(_parameter(request.parameters, "binary_data_output", bool, "request"))
    if request.outputs is None:
        return [OutputChoice(spec.name, binary_default) for spec in manifest.outputs]
    choices, seen = [], set()
    for wanted in request.outputs:
        spec = _claim_tensor("output", wanted.name, specs, seen)
        where = f"output {wanted.name!r}"
        if "shared_memory_region" in (wanted.parameters or {}):
            raise ProtocolError(f"{where}: shared memory is not supported by this agent")
        binary = _parameter(wanted.parameters, "binary_data", bool, where)
        classes = _parameter(wanted.parameters, "classification", int, where) or 0
        if classes < 0:
            raise ProtocolError(f"{where}: classification must be a positive number of classes, got {classes}")
        if classes and (spec.datatype not in NUMPY_DTYPES or spec.datatype == "BOOL" or not spec.shape):
            raise ProtocolError(f"{where} is {spec.datatype} of rank {len(spec.shape)}: it cannot be classified")
        choices.append(OutputChoice(wanted.name, binary_default if binary is None else binary, classes))
    return choices


def classify(scores: np.ndarray, count: int, labels: list[str]) -> np.ndarray:
    """Top-``count`` classes per row as BYTES ``"score:index:label"`` (``"score:index"`` past the labels).

    A rank-1 tensor is one row; for higher ranks dimension 0 is the batch and the
    rest is flattened, as Triton does.
    """
    if scores.ndim <= 1:
        rows = scores.reshape(1, scores.size)
    else:
        rows = scores.reshape(scores.shape[0], math.prod(scores.shape[1:]))
    count = min(count, rows.shape[1])
    # Stable sort on the negated scores: ties keep the lower index first.
    order = np.argsort(-rows.astype(np.float64), axis=1, kind="stable")[:, :count]
    result = np.empty((rows.shape[0], count), dtype=object)
    for row_index, (row, indices) in enumerate(zip(rows, order)):
        for column, index in enumerate(indices):
            label = f":{labels[index]}" if index < len(labels) else ""
            result[row_index, column] = f"{float(row[index]):f}:{index}{label}".encode()
    return result[0] if scores.ndim <= 1 else result


def _bytes_blob(array: np.ndarray) -> bytes:
    parts = []
    for element in array.reshape(-1):
        raw = element if isinstance(element, bytes) else str(element).encode("utf-8")
        parts.append(_LENGTH_PREFIX.pack(len(raw)))
        parts.append(raw)
    return b"".join(parts)


def _json_data(array: np.ndarray, datatype: str) -> list:
    if datatype == "BYTES":
        return [
            element.decode("utf-8", errors="replace") if isinstance(element, bytes) else str(element)
            for element in array.reshape(-1)
        ]
    return array.reshape(-1).tolist()


def _binary_blob(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        return _bytes_blob(array)
    dtype = NUMPY_DTYPES[datatype]
    return np.ascontiguousarray(array, dtype=dtype.newbyteorder("<")).tobytes()


def encode_response(
    *,
    model_name: str,
    model_version: str,
    request_id: str | None,
    outputs: dict[str, np.ndarray],
    choices: list[OutputChoice],
    manifest: Manifest,
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary outputs follow it (else None)."""
    datatypes = {spec.name: spec.datatype for spec in manifest.outputs}
    described, blobs = [], []
    for choice in choices:
        array, datatype = outputs[choice.name], datatypes[choice.name]
        if choice.classes:
            array, datatype = classify(array, choice.classes, manifest.task.labels), "BYTES"
        entry: dict = {"name": choice.name, "datatype": datatype, "shape": list(array.shape)}
        if choice.binary:
            blob = _binary_blob(array, datatype)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = _json_data(array, datatype)
        described.append(entry)
    document = {"model_name": model_name, "model_version": model_version, "outputs": described}
    if request_id is not None:
        document["id"] = request_id
    header = json.dumps(document, separators=(",", ":")).encode("utf-8")
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)
