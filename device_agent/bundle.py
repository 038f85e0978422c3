"""THE edgekit bundle format (``.ekb``): write, sign, verify and read, in one place.

A bundle is one tar archive (plain, or gzip-compressed) holding:

- ``manifest.json``: the :class:`Manifest`, serialised canonically (sorted keys,
  no insignificant white space, UTF-8);
- ``manifest.sig``: a small JSON document ``{"algorithm": "ed25519", "key_id":
  ..., "signature": base64}`` whose signature covers the exact bytes of
  ``manifest.json``;
- every other file (model, tokenizer, golden vectors, ...), each listed in the
  manifest's ``files`` with its SHA-256 and size.

The build imports this module to write bundles and the device agent to read
them, so both sides agree by construction. Reading never trusts the archive:
entries are streamed into a private temporary directory under size and count
limits, anything that is not a plain file inside the bundle root is refused, and
the temporary directory is removed whatever happens.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import IO, Annotated, Literal, Union

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError, field_validator, model_validator

from device_agent.errors import UserError
from device_agent.files import atomic_output, sha256_file
from device_agent.keys import Keyring, key_id

SCHEMA_VERSION = 1
SUPPORTED_SCHEMA_VERSIONS = (1,)
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
RESERVED_NAMES = frozenset({MANIFEST_NAME, SIGNATURE_NAME})
_CHUNK = 1 << 20
# The model input of table and spectral bundles, which the device computes from the raw input it also takes.
FEATURES_INPUT = "features"
SPECTRAL_INPUT = "series"  # a spectral bundle's raw windows
# Per channel, the statistics before the band energies in a spectral feature row: mean, std, RMS, skewness, kurtosis.
SPECTRAL_STATISTICS = 5
# A table's columns, and the categories one column keeps (the build refuses more, naming the column).
MAX_TABLE_COLUMNS = 1024
MAX_TABLE_CATEGORIES = 1000


class Check(str, Enum):
    """The verification steps; a rejected bundle names the one that failed."""

    ARCHIVE = "archive"
    ENTRY_COUNT = "entry-count"
    ENTRY_TYPE = "entry-type"
    ENTRY_PATH = "entry-path"
    DUPLICATE_ENTRY = "duplicate-entry"
    SIZE_LIMIT = "size-limit"
    MANIFEST_MISSING = "manifest-missing"
    SIGNATURE_MISSING = "signature-missing"
    SIGNATURE = "signature"
    UNTRUSTED_KEY = "untrusted-key"
    MANIFEST_JSON = "manifest-json"
    SCHEMA_VERSION = "schema-version"
    MANIFEST_SCHEMA = "manifest-schema"
    FILE_MISSING = "file-missing"
    FILE_UNLISTED = "file-unlisted"
    FILE_SIZE = "file-size"
    FILE_HASH = "file-hash"
    MANIFEST_REFERENCE = "manifest-reference"


class BundleError(UserError):
    """A bundle failed one verification check (or could not be written)."""

    def __init__(self, check: Check, detail: str) -> None:
        self.check = check
        self.detail = detail
        super().__init__(f"bundle rejected [{check.value}]: {detail}")


# --------------------------------------------------------------------------- manifest schema


class UnpackFailed(UserError):
    """The bundle could not be unpacked for a reason of this device's (a full disk), not of the bundle's."""

    status_code = 507


# Errors writing the unpacked files that say nothing about the bundle.
_STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_VERSION_PATTERN = r"^[0-9]+(\.[0-9]+){0,3}$"
_SHA256_PATTERN = r"^[0-9a-f]{64}$"

# Open Inference Protocol datatypes (KServe v2).
Datatype = Literal[
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BF16", "BYTES",
]


class ModelInfo(_Strict):
    name: str = Field(pattern=_NAME_PATTERN)
    version: str = Field(pattern=_VERSION_PATTERN, description="dotted integers, compared numerically")

    def version_key(self) -> tuple[int, ...]:
        """The version as a tuple of integers, so that 1.10 > 1.9."""
        return tuple(int(part) for part in self.version.split("."))


class TargetInfo(_Strict):
    """What the device checks before it installs: who the bundle was built for."""

    name: str = Field(pattern=_NAME_PATTERN)
    profile_sha256: str = Field(pattern=_SHA256_PATTERN)
    cpu_arch: Literal["x86_64", "aarch64"]
    accelerator: Literal["cpu", "cuda"]
    gpu_compute_capability: str | None = None
    software: dict[str, str] = {}


class RuntimeInfo(_Strict):
    engine: Literal["onnxruntime", "tensorrt", "openvino"]
    execution_providers: list[str] = Field(min_length=1)
    model_file: str
    # Options the device needs to build a TensorRT engine itself (engines are
    # tied to the GPU and TensorRT version, so Jetson builds them on first load).
    engine_build: dict[str, JsonValue] | None = None
    # The most rows the build's gates ran the model with at once. Dynamic int8 takes its activation ranges over a whole
    # run, so its answers were measured one row per run (1): the agent then never joins requests. None: any.
    max_rows_per_run: int | None = Field(None, ge=1)


class TensorSpec(_Strict):
    name: str = Field(min_length=1)
    datatype: Datatype
    shape: list[Annotated[int, Field(ge=0)] | Annotated[str, Field(min_length=1)]] = Field(
        description="an int for a fixed dimension, a name for a symbolic one"
    )
    value_range: tuple[int, int] | None = Field(
        None, description="the values an integer input may hold, inclusive (it indexes a table: token ids, type ids)"
    )


class TaskInfo(_Strict):
    kind: Literal["text-classification", "image-classification", "tabular-classification", "anomaly-detection", "tensor"]
    labels: list[str] = []


class NoPreprocessing(_Strict):
    kind: Literal["none"] = "none"


class TokenizerPreprocessing(_Strict):
    kind: Literal["tokenizer"] = "tokenizer"
    tokenizer_file: str
    max_length: int = Field(gt=0)


class ImagePreprocessing(_Strict):
    kind: Literal["image"] = "image"
    resize: int | None = Field(default=None, gt=0, description="shorter side, before the crop")
    crop: tuple[int, int] = Field(description="height, width")
    channel_order: Literal["RGB", "BGR", "L"] = "RGB"
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    scale: float = 1 / 255
    mean: list[float] = []
    std: list[float] = []


class TableColumn(_Strict):
    """One column of a raw table row and how it becomes model features (``device_agent.preprocess.TableEncoder``)."""

    name: str = Field(min_length=1, max_length=256)
    kind: Literal["numeric", "categorical"]
    fill: float | None = Field(None, description="numeric: the value a missing (null or absent) one takes: the training median")
    categories: list[Annotated[str, Field(max_length=256)]] | None = Field(
        None, max_length=MAX_TABLE_CATEGORIES,
        description="categorical: the training categories, one feature each; any other value or a missing one "
                    "sets one more feature, 'other'")

    @model_validator(mode="after")
    def _kind_agrees(self) -> "TableColumn":
        if self.kind == "numeric" and (self.fill is None or self.categories is not None):
            raise ValueError(f"numeric column {self.name!r} needs fill and no categories")
        if self.kind == "categorical" and (not self.categories or self.fill is not None):
            raise ValueError(f"categorical column {self.name!r} needs categories and no fill")
        return self

    @property
    def width(self) -> int:
        """Features this column takes in the model's input: one, or one per category plus 'other'."""
        return 1 if self.kind == "numeric" else len(self.categories or ()) + 1


class TablePreprocessing(_Strict):
    """Raw rows (JSON objects, column name → value) become one FP32 feature row each, columns in this order."""

    kind: Literal["table"] = "table"
    columns: list[TableColumn] = Field(min_length=1, max_length=MAX_TABLE_COLUMNS)
    ignored: list[Annotated[str, Field(max_length=256)]] = Field(
        [], max_length=MAX_TABLE_COLUMNS,
        description="columns of the training table the model does not read (ids, the label): a raw row may carry them")

    @model_validator(mode="after")
    def _unique_names(self) -> "TablePreprocessing":
        names = [column.name for column in self.columns]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"columns {duplicates} appear more than once")
        return self

    @property
    def width(self) -> int:
        return sum(column.width for column in self.columns)


class SpectralPreprocessing(_Strict):
    """Raw FP32 windows ``[batch, channels, steps]`` become per-channel statistics and spectral band energies
    (``device_agent.preprocess.spectral_features``), the model's FP32 ``features`` input."""

    kind: Literal["spectral"] = "spectral"
    channels: int = Field(ge=1, le=1024)
    steps: int = Field(ge=4, le=1 << 20)
    bands: int = Field(ge=1, le=256, description="equal-width frequency bands between DC (excluded) and Nyquist")

    @model_validator(mode="after")
    def _bands_fit(self) -> "SpectralPreprocessing":
        if self.bands > self.steps // 2:
            raise ValueError(f"{self.bands} bands need windows of at least {2 * self.bands} steps; these have {self.steps}")
        return self

    @property
    def width(self) -> int:
        return self.channels * (SPECTRAL_STATISTICS + self.bands)


Preprocessing = Annotated[
    Union[NoPreprocessing, TokenizerPreprocessing, ImagePreprocessing, TablePreprocessing, SpectralPreprocessing],
    Field(discriminator="kind"),
]


class GoldenVectors(_Strict):
    """Inputs with the outputs the final model gave at build time (an ``.npz``)."""

    file: str
    atol: float = Field(ge=0)
    rtol: float = Field(ge=0)


class FileEntry(_Strict):
    path: str
    sha256: str = Field(pattern=_SHA256_PATTERN)
    size: int = Field(ge=0)


class Manifest(_Strict):
    """Everything a device needs to know about a bundle, signed as one document."""

    schema_version: Literal[1] = SCHEMA_VERSION
    model: ModelInfo
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    target: TargetInfo
    runtime: RuntimeInfo
    precision: Literal["fp32", "fp16", "int8"]
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)
    task: TaskInfo
    preprocessing: Preprocessing = NoPreprocessing()
    metrics: dict[str, JsonValue] = {}
    golden: GoldenVectors
    # Filled by the package pass with the drift reference (histograms and
    # thresholds); None until a build computes one.
    drift_reference: dict[str, JsonValue] | None = None
    files: list[FileEntry] = []

    @field_validator("created_at")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("created_at needs a time zone (UTC)")
        return value

    @model_validator(mode="after")
    def _unique_files(self) -> "Manifest":
        paths = [entry.path for entry in self.files]
        duplicates = sorted({p for p in paths if paths.count(p) > 1})
        if duplicates:
            raise ValueError(f"files lists {duplicates} more than once")
        reserved = sorted(RESERVED_NAMES.intersection(paths))
        if reserved:
            raise ValueError(f"files must not list {reserved}: they are the manifest and its signature")
        return self

    @model_validator(mode="after")
    def _table_input_fits(self) -> "Manifest":
        if isinstance(self.preprocessing, (TablePreprocessing, SpectralPreprocessing)):
            spec = self.inputs[0]
            width = self.preprocessing.width
            if (len(self.inputs) != 1 or spec.name != FEATURES_INPUT or spec.datatype != "FP32" or len(spec.shape) != 2
                    or spec.shape[1] != width):
                raise ValueError(f"a {self.preprocessing.kind} bundle's model takes one FP32 input {FEATURES_INPUT!r} "
                                 f"[batch, {width}] (its features); "
                                 f"this one takes {[f'{i.name} {i.datatype} {i.shape}' for i in self.inputs]}")
        return self

    def referenced_files(self) -> dict[str, str]:
        """The files other manifest fields point at, by the field that names them."""
        refs = {"runtime.model_file": self.runtime.model_file, "golden.file": self.golden.file}
        if isinstance(self.preprocessing, TokenizerPreprocessing):
            refs["preprocessing.tokenizer_file"] = self.preprocessing.tokenizer_file
        return refs


def canonical_manifest_bytes(manifest: Manifest) -> bytes:
    """The exact bytes that are written as ``manifest.json`` and signed."""
    payload = manifest.model_dump(mode="json")
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


# --------------------------------------------------------------------------- signatures


def sign_manifest(manifest_bytes: bytes, private_key: Ed25519PrivateKey) -> bytes:
    """The content of ``manifest.sig`` for these manifest bytes."""
    document = {
        "algorithm": "ed25519",
        "key_id": key_id(private_key.public_key()),
        "signature": base64.b64encode(private_key.sign(manifest_bytes)).decode("ascii"),
    }
    return json.dumps(document, sort_keys=True).encode("ascii")


def verify_signature(manifest_bytes: bytes, signature_bytes: bytes, keyring: Keyring) -> str:
    """Check ``manifest.sig`` against the keyring; return the id of the key that signed."""
    try:
        document = json.loads(signature_bytes)
        algorithm, signer, signature = document["algorithm"], document["key_id"], document["signature"]
        raw_signature = base64.b64decode(signature, validate=True)
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise BundleError(Check.SIGNATURE, f"{SIGNATURE_NAME} is malformed; rebuild or re-sign the bundle") from None
    if algorithm != "ed25519":
        raise BundleError(Check.SIGNATURE, f"signature algorithm {algorithm!r} is not supported (only ed25519)")
    public_key = keyring.keys.get(signer) if isinstance(signer, str) else None
    if public_key is None:
        raise BundleError(
            Check.UNTRUSTED_KEY,
            f"signed by key {signer!r}, which is not in keyring {keyring.directory} "
            f"(trusted: {', '.join(sorted(keyring.keys))}); copy the signer's edgekit.pub there if you trust it",
        )
    try:
        public_key.verify(raw_signature, manifest_bytes)
    except InvalidSignature:
        raise BundleError(
            Check.SIGNATURE,
            f"signature by key {signer} does not match {MANIFEST_NAME}: the manifest was changed after signing",
        ) from None
    return signer


# --------------------------------------------------------------------------- writing


def _tar_info(name: str, size: int, mtime: float) -> tarfile.TarInfo:
    # Fixed owner and mode: bundles of the same inputs differ only by content.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, int(mtime), 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_bundle(
    out_path: Path,
    manifest: Manifest,
    payload: Mapping[str, Path],
    private_key: Ed25519PrivateKey,
) -> Manifest:
    """Write a signed bundle and return the manifest as written.

    ``payload`` maps archive names to files on disk. The manifest's ``files`` list
    is computed here from the payload (whatever the caller put there is
    replaced). The archive is written under a temporary name and renamed into
    place, so a crash never leaves a half-written bundle at ``out_path``.
    """
    for name in payload:
        problem = _path_problem(name)
        if problem or name in RESERVED_NAMES:
            raise BundleError(Check.ENTRY_PATH, f"cannot add {name!r} to a bundle: {problem or 'the name is reserved'}")
    entries = []
    for name, source in sorted(payload.items()):
        digest, size = sha256_file(source)
        entries.append(FileEntry(path=name, sha256=digest, size=size))
    written = manifest.model_copy(update={"files": entries})
    written = Manifest.model_validate(written.model_dump())  # re-run the validators on the final list
    listed = {entry.path for entry in entries}
    for field, name in written.referenced_files().items():
        if name not in listed:
            raise BundleError(Check.MANIFEST_REFERENCE, f"{field} names {name!r}, but the payload has no such file")

    manifest_bytes = canonical_manifest_bytes(written)
    signature_bytes = sign_manifest(manifest_bytes, private_key)
    mtime = written.created_at.timestamp()
    with atomic_output(out_path) as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, data in ((MANIFEST_NAME, manifest_bytes), (SIGNATURE_NAME, signature_bytes)):
            archive.addfile(_tar_info(name, len(data), mtime), io.BytesIO(data))
        for entry in entries:
            with payload[entry.path].open("rb") as handle:
                archive.addfile(_tar_info(entry.path, entry.size, mtime), handle)
    return written


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class BundleLimits:
    """Bounds on what reading a bundle may unpack (defaults fit large edge models)."""

    max_entries: int = 256
    max_entry_bytes: int = 4 << 30
    max_total_bytes: int = 8 << 30
    max_manifest_bytes: int = 8 << 20


_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")


def _path_problem(name: str) -> str | None:
    """Why ``name`` may not be an entry of a bundle, or None when it may."""
    if not name or "\x00" in name:
        return "empty name"
    if name.startswith("/") or _WINDOWS_DRIVE.match(name):
        return "absolute path"
    if "\\" in name:
        return "backslash in path"
    parts = name.split("/")
    if ".." in parts:
        return "path escapes the bundle root with '..'"
    if any(part in ("", ".") for part in parts):
        return "path is not in canonical form"
    return None


def _entry_kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return "symlink"
    if member.islnk():
        return "hard link"
    if member.ischr() or member.isblk():
        return "device"
    if member.isfifo():
        return "FIFO"
    if member.isdir():
        return "directory"
    return "special file"


@dataclass(frozen=True)
class _Unpacked:
    sha256: str
    size: int


def _scan_archive(bundle_path: Path, limits: BundleLimits, take_entry: Callable[[str, IO[bytes], int], None]) -> None:
    """Stream the archive once, checking every entry before ``take_entry`` sees its data."""
    seen: set[str] = set()
    total = 0
    try:
        with tarfile.open(bundle_path, mode="r|*") as archive:
            for count, member in enumerate(archive, start=1):
                name = member.name
                if count > limits.max_entries:
                    raise BundleError(Check.ENTRY_COUNT, f"more than {limits.max_entries} entries")
                if not member.isreg():
                    raise BundleError(Check.ENTRY_TYPE, f"entry {name!r} is a {_entry_kind(member)}; bundles hold plain files only")
                problem = _path_problem(name)
                if problem:
                    raise BundleError(Check.ENTRY_PATH, f"entry {name!r}: {problem}")
                if name in seen:
                    raise BundleError(Check.DUPLICATE_ENTRY, f"entry {name!r} appears more than once")
                seen.add(name)
                if member.size > limits.max_entry_bytes:
                    raise BundleError(Check.SIZE_LIMIT, f"entry {name!r} is {member.size} bytes, over the {limits.max_entry_bytes}-byte limit per entry")
                total += member.size
                if total > limits.max_total_bytes:
                    raise BundleError(Check.SIZE_LIMIT, f"unpacked size passes the {limits.max_total_bytes}-byte limit at entry {name!r}")
                reader = archive.extractfile(member)
                assert reader is not None  # a regular file always has a reader
                take_entry(name, reader, member.size)
    except BundleError:
        raise
    except OSError as exc:
        if exc.errno in _STORAGE_ERRNOS:  # this device's disk, not the bundle: the same bundle may install later
            raise UnpackFailed(f"cannot unpack {bundle_path.name} on this device: {exc.strerror}; free space (or fix the "
                               "disk) under the agent's state folder, then install again") from None
        raise BundleError(Check.ARCHIVE, f"{bundle_path} is not a readable bundle archive (truncated or corrupt: {exc})") from None
    except (tarfile.TarError, EOFError, ValueError) as exc:
        raise BundleError(Check.ARCHIVE, f"{bundle_path} is not a readable bundle archive (truncated or corrupt: {exc})") from None


def _unpack_checked(bundle_path: Path, dest: Path, limits: BundleLimits) -> dict[str, _Unpacked]:
    """Stream every entry of the archive into ``dest``, refusing anything unsafe."""
    unpacked: dict[str, _Unpacked] = {}

    def take(name: str, reader: IO[bytes], size: int) -> None:
        unpacked[name] = _write_entry(reader, dest, name, size)

    _scan_archive(bundle_path, limits, take)
    return unpacked


def _write_entry(source: IO[bytes], dest: Path, name: str, expected_size: int) -> _Unpacked:
    target = dest.joinpath(*name.split("/"))
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except (FileExistsError, NotADirectoryError, IsADirectoryError):
        raise BundleError(Check.ENTRY_PATH, f"entry {name!r} collides with another entry's path") from None
    digest, size = hashlib.sha256(), 0
    with os.fdopen(fd, "wb") as handle:
        while chunk := source.read(_CHUNK):
            size += len(chunk)
            if size > expected_size:  # tarfile bounds this already; never trust one layer alone
                raise BundleError(Check.SIZE_LIMIT, f"entry {name!r} holds more data than its header says")
            digest.update(chunk)
            handle.write(chunk)
    if size != expected_size:
        raise BundleError(Check.ARCHIVE, f"entry {name!r} is truncated ({size} of {expected_size} bytes)")
    return _Unpacked(sha256=digest.hexdigest(), size=size)


def _parse_manifest(manifest_bytes: bytes) -> Manifest:
    try:
        document = json.loads(manifest_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(Check.MANIFEST_JSON, f"{MANIFEST_NAME} is not JSON ({exc})") from None
    if not isinstance(document, dict):
        raise BundleError(Check.MANIFEST_SCHEMA, f"{MANIFEST_NAME} must hold a JSON object")
    version = document.get("schema_version")
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        raise BundleError(
            Check.SCHEMA_VERSION,
            f"schema version {version!r} is unknown to this reader (it reads {list(SUPPORTED_SCHEMA_VERSIONS)}); "
            "upgrade edgekit on this machine, or rebuild the bundle with a matching edgekit",
        )
    try:
        return Manifest.model_validate(document)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or '(top level)'}: {error['msg']}" for error in exc.errors()
        )
        raise BundleError(Check.MANIFEST_SCHEMA, f"{MANIFEST_NAME} does not match schema {version}: {problems}") from None


def _check_files(manifest: Manifest, unpacked: Mapping[str, _Unpacked]) -> None:
    for entry in manifest.files:
        found = unpacked.get(entry.path)
        if found is None:
            raise BundleError(Check.FILE_MISSING, f"{entry.path!r} is listed in the manifest but not in the archive")
        if found.size != entry.size:
            raise BundleError(Check.FILE_SIZE, f"{entry.path!r} is {found.size} bytes; the manifest says {entry.size}")
        if found.sha256 != entry.sha256:
            raise BundleError(Check.FILE_HASH, f"{entry.path!r} has SHA-256 {found.sha256[:12]}…; the manifest says {entry.sha256[:12]}…")
    listed = {entry.path for entry in manifest.files} | RESERVED_NAMES
    unlisted = sorted(set(unpacked) - listed)
    if unlisted:
        raise BundleError(Check.FILE_UNLISTED, f"{unlisted} are in the archive but not in the manifest")
    for field, name in manifest.referenced_files().items():
        if name not in listed:
            raise BundleError(Check.MANIFEST_REFERENCE, f"{field} names {name!r}, which the bundle does not carry")


class VerifiedBundle:
    """A bundle that passed every check, unpacked into a private temporary directory.

    Use it as a context manager; the directory is removed on exit. ``root`` is
    only valid until then.
    """

    def __init__(self, manifest: Manifest, manifest_bytes: bytes, signer: str, root: Path, workdir: Path) -> None:
        self.manifest = manifest
        self.manifest_bytes = manifest_bytes
        self.signer = signer
        self.root = root
        self._workdir = workdir

    def path(self, name: str) -> Path:
        """Where a listed file of the bundle lies on disk."""
        if name not in {entry.path for entry in self.manifest.files}:
            raise KeyError(f"{name!r} is not a file of this bundle")
        return self.root.joinpath(*name.split("/"))

    def close(self) -> None:
        shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> "VerifiedBundle":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def open_bundle(
    bundle_path: Path,
    keyring: Keyring,
    *,
    limits: BundleLimits = BundleLimits(),
    scratch_dir: Path | None = None,
) -> VerifiedBundle:
    """Verify a bundle completely and return it unpacked; raise :class:`BundleError` naming the failed check.

    Checks, in order: archive readable; entry count, type, path and size limits;
    no duplicate names; manifest and signature present; signature by a key in the
    keyring; manifest is JSON of a known schema version and valid; every listed
    file present with its size and hash; nothing unlisted; every file the
    manifest refers to is carried. Nothing is written outside a temporary
    directory (under ``scratch_dir`` when given), which is removed on failure.
    """
    if not bundle_path.is_file():
        raise BundleError(Check.ARCHIVE, f"{bundle_path} does not exist or is not a file")
    workdir = Path(tempfile.mkdtemp(prefix="edgekit-bundle-", dir=scratch_dir))
    try:
        root = workdir / "root"
        root.mkdir()
        unpacked = _unpack_checked(bundle_path, root, limits)
        if MANIFEST_NAME not in unpacked:
            raise BundleError(Check.MANIFEST_MISSING, f"the archive has no {MANIFEST_NAME}; is this an edgekit bundle?")
        if SIGNATURE_NAME not in unpacked:
            raise BundleError(Check.SIGNATURE_MISSING, f"the archive has no {SIGNATURE_NAME}; unsigned bundles are never accepted")
        if unpacked[MANIFEST_NAME].size > limits.max_manifest_bytes:
            raise BundleError(Check.SIZE_LIMIT, f"{MANIFEST_NAME} is over the {limits.max_manifest_bytes}-byte limit")
        manifest_bytes = (root / MANIFEST_NAME).read_bytes()
        signer = verify_signature(manifest_bytes, (root / SIGNATURE_NAME).read_bytes(), keyring)
        manifest = _parse_manifest(manifest_bytes)
        _check_files(manifest, unpacked)
        return VerifiedBundle(manifest, manifest_bytes, signer, root, workdir)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise


def read_manifest_unverified(bundle_path: Path, *, limits: BundleLimits = BundleLimits()) -> tuple[Manifest, list[str]]:
    """Read the manifest and the entry names without checking the signature (for ``bundle inspect``).

    Nothing is unpacked to disk; the archive's entries are still checked for
    type and path safety, and the manifest for schema.
    """
    if not bundle_path.is_file():
        raise BundleError(Check.ARCHIVE, f"{bundle_path} does not exist or is not a file")
    names: list[str] = []
    manifest_bytes: bytes | None = None

    def take(name: str, reader: IO[bytes], size: int) -> None:
        nonlocal manifest_bytes
        names.append(name)
        if name == MANIFEST_NAME:
            if size > limits.max_manifest_bytes:
                raise BundleError(Check.SIZE_LIMIT, f"{MANIFEST_NAME} is over the {limits.max_manifest_bytes}-byte limit")
            manifest_bytes = reader.read()

    _scan_archive(bundle_path, limits, take)
    if manifest_bytes is None:
        raise BundleError(Check.MANIFEST_MISSING, f"the archive has no {MANIFEST_NAME}; is this an edgekit bundle?")
    return _parse_manifest(manifest_bytes), names
