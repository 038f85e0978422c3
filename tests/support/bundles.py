"""Real bundles for tests: a tiny ONNX classifier, its golden vectors, and a corpus of broken bundles.

The corpus is shared: the Foundation tests check that reading rejects each case
for the right reason, and the device agent's install tests reuse it.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.bundle import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    BundleLimits,
    Check,
    GoldenVectors,
    ImagePreprocessing,
    Manifest,
    ModelInfo,
    RuntimeInfo,
    TargetInfo,
    TaskInfo,
    TensorSpec,
    canonical_manifest_bytes,
    sign_manifest,
    write_bundle,
)

LABELS = ["cat", "dog", "bird"]


def write_tiny_classifier(directory: Path, seed: int = 0) -> Path:
    """A real ONNX model: logits = x @ W + b, x of shape [batch, 4], three classes."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weight = numpy_helper.from_array(rng.normal(size=(4, 3)).astype(np.float32), "W")
    bias = numpy_helper.from_array(rng.normal(size=(3,)).astype(np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["logits"])],
        "tiny-classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        initializer=[weight, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = directory / "model.onnx"
    onnx.save(model, path)
    return path


def write_golden(directory: Path, model_path: Path) -> Path:
    """Golden vectors: a few inputs and what ONNX Runtime answers for them."""
    import onnxruntime

    inputs = np.random.default_rng(1).normal(size=(2, 4)).astype(np.float32)
    session = onnxruntime.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"x": inputs})
    path = directory / "golden.npz"
    np.savez(path, **{"input:x": inputs, "output:logits": logits})
    return path


def tiny_manifest(version: str = "1.0.0", profile_sha256: str = "0" * 64) -> Manifest:
    return Manifest(
        model=ModelInfo(name="tiny-classifier", version=version),
        target=TargetInfo(name="x86-64-cpu", profile_sha256=profile_sha256, cpu_arch="x86_64", accelerator="cpu"),
        runtime=RuntimeInfo(engine="onnxruntime", execution_providers=["CPUExecutionProvider"], model_file="model.onnx"),
        precision="fp32",
        inputs=[TensorSpec(name="x", datatype="FP32", shape=["batch", 4])],
        outputs=[TensorSpec(name="logits", datatype="FP32", shape=["batch", 3])],
        task=TaskInfo(kind="tensor", labels=LABELS),
        golden=GoldenVectors(file="golden.npz", atol=1e-5, rtol=1e-4),
        metrics={"accuracy": 1.0},
    )


def tiny_payload(directory: Path) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    model = write_tiny_classifier(directory)
    return {"model.onnx": model, "golden.npz": write_golden(directory, model)}


def write_tiny_bundle(out: Path, key: Ed25519PrivateKey, version: str = "1.0.0") -> Manifest:
    return write_bundle(out, tiny_manifest(version), tiny_payload(out.parent / f"{out.stem}-payload"), key)


# --------------------------------------------------------------------------- the broken-bundle corpus


@dataclass
class Entry:
    """One raw tar entry, written exactly as given (no safety checks: that is the point)."""

    name: str
    data: bytes = b""
    kind: bytes = tarfile.REGTYPE
    linkname: str = ""
    declared_size: int | None = None

    def info(self) -> tarfile.TarInfo:
        info = tarfile.TarInfo(self.name)
        info.type, info.linkname, info.mode = self.kind, self.linkname, 0o644
        info.size = len(self.data) if self.kind == tarfile.REGTYPE else 0
        if self.kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
            info.devmajor, info.devminor = 1, 3
        return info


def write_raw_archive(path: Path, entries: list[Entry], compress: bool = False) -> Path:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for entry in entries:
            archive.addfile(entry.info(), io.BytesIO(entry.data) if entry.kind == tarfile.REGTYPE else None)
    data = buffer.getvalue()
    path.write_bytes(gzip.compress(data, compresslevel=1) if compress else data)
    return path


@dataclass
class Parts:
    """The pieces of a valid bundle, to be broken one at a time."""

    manifest: Manifest
    payload: dict[str, bytes]
    key: Ed25519PrivateKey

    def manifest_bytes(self, manifest: Manifest | None = None) -> bytes:
        return canonical_manifest_bytes(manifest or self.manifest)

    def entries(self, manifest_bytes: bytes | None = None, key: Ed25519PrivateKey | None = None) -> list[Entry]:
        manifest_bytes = manifest_bytes if manifest_bytes is not None else self.manifest_bytes()
        signature = sign_manifest(manifest_bytes, key or self.key)
        return [Entry(MANIFEST_NAME, manifest_bytes), Entry(SIGNATURE_NAME, signature)] + [
            Entry(name, data) for name, data in sorted(self.payload.items())
        ]


def valid_parts(workdir: Path, key: Ed25519PrivateKey) -> Parts:
    bundle = workdir / "valid.ekb"
    manifest = write_tiny_bundle(bundle, key)
    payload_dir = workdir / "valid-payload"
    return Parts(manifest, {name: (payload_dir / name).read_bytes() for name in ("model.onnx", "golden.npz")}, key)


@dataclass
class BrokenBundle:
    name: str
    path: Path
    check: Check
    limits: BundleLimits = field(default_factory=BundleLimits)


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1:]


def _entries_replacing(entries: list[Entry], name: str, data: bytes) -> list[Entry]:
    return [Entry(e.name, data) if e.name == name else e for e in entries]


def build_corpus(workdir: Path, key: Ed25519PrivateKey, untrusted_key: Ed25519PrivateKey) -> list[BrokenBundle]:
    """Write every broken or malicious bundle the reader must refuse, each with the check that must refuse it."""
    workdir.mkdir(parents=True, exist_ok=True)
    parts = valid_parts(workdir, key)
    good = parts.entries()
    manifest_bytes = parts.manifest_bytes()
    model = parts.payload["model.onnx"]
    cases: list[BrokenBundle] = []

    def case(name: str, check: Check, entries: list[Entry], compress: bool = False, limits: BundleLimits | None = None) -> None:
        path = write_raw_archive(workdir / f"{name}.ekb", entries, compress=compress)
        cases.append(BrokenBundle(name, path, check, limits or BundleLimits()))

    def resigned(**changes: object) -> list[Entry]:
        """Entries for a manifest edited with ``changes`` and signed again by the trusted key."""
        document = json.loads(manifest_bytes)
        document.update(changes)
        return parts.entries(json.dumps(document, sort_keys=True, separators=(",", ":")).encode())

    name_at = manifest_bytes.index(b"tiny-classifier")
    case("manifest-byte-flip", Check.SIGNATURE, _entries_replacing(good, MANIFEST_NAME, _flip(manifest_bytes, name_at)))
    case("model-byte-flip", Check.FILE_HASH, _entries_replacing(good, "model.onnx", _flip(model, len(model) // 2)))
    case("missing-signature", Check.SIGNATURE_MISSING, [e for e in good if e.name != SIGNATURE_NAME])
    case("malformed-signature", Check.SIGNATURE, _entries_replacing(good, SIGNATURE_NAME, b"not a signature"))
    case("untrusted-key", Check.UNTRUSTED_KEY, parts.entries(key=untrusted_key))
    case("missing-manifest", Check.MANIFEST_MISSING, [e for e in good if e.name != MANIFEST_NAME])
    case("file-listed-but-missing", Check.FILE_MISSING, [e for e in good if e.name != "model.onnx"])
    case("file-present-but-unlisted", Check.FILE_UNLISTED, good + [Entry("extra.txt", b"smuggled")])
    files = [dict(f, size=f["size"] + 1) if f["path"] == "model.onnx" else f for f in json.loads(manifest_bytes)["files"]]
    case("wrong-size", Check.FILE_SIZE, resigned(files=files))
    golden = dict(json.loads(manifest_bytes)["golden"], file="absent.npz")
    case("reference-to-absent-file", Check.MANIFEST_REFERENCE, resigned(golden=golden))
    case("dotdot-entry", Check.ENTRY_PATH, good + [Entry("../escaped", b"x")])
    case("nested-dotdot-entry", Check.ENTRY_PATH, good + [Entry("a/../../escaped", b"x")])
    case("absolute-entry", Check.ENTRY_PATH, good + [Entry("/tmp/edgekit-escaped", b"x")])
    case("symlink-entry", Check.ENTRY_TYPE, good + [Entry("link", kind=tarfile.SYMTYPE, linkname="/etc/passwd")])
    case("hardlink-entry", Check.ENTRY_TYPE, good + [Entry("hard", kind=tarfile.LNKTYPE, linkname="model.onnx")])
    case("device-entry", Check.ENTRY_TYPE, good + [Entry("null", kind=tarfile.CHRTYPE)])
    case("fifo-entry", Check.ENTRY_TYPE, good + [Entry("pipe", kind=tarfile.FIFOTYPE)])
    case("directory-entry", Check.ENTRY_TYPE, [Entry("sub", kind=tarfile.DIRTYPE)] + good)
    case("duplicate-entry", Check.DUPLICATE_ENTRY, good + [Entry("model.onnx", model)])
    case("manifest-not-json", Check.MANIFEST_JSON, parts.entries(b"{not json"))
    case("unknown-schema-version", Check.SCHEMA_VERSION, resigned(schema_version=99))
    case("manifest-schema-violation", Check.MANIFEST_SCHEMA, resigned(precision="int3"))
    # 64 MiB of zeros gzip to ~64 KiB: a decompression bomb against a 16 MiB entry limit.
    bomb_limits = BundleLimits(max_entry_bytes=16 << 20, max_total_bytes=32 << 20)
    case("gzip-bomb-entry", Check.SIZE_LIMIT, good + [Entry("bomb.bin", bytes(64 << 20))], compress=True, limits=bomb_limits)
    many = [Entry(f"part{index}.bin", bytes(12 << 20)) for index in range(4)]
    case("gzip-bomb-total", Check.SIZE_LIMIT, good + many, compress=True, limits=bomb_limits)
    case("too-many-entries", Check.ENTRY_COUNT, good + [Entry(f"f{i}", b"") for i in range(8)], limits=BundleLimits(max_entries=8))
    cases.append(BrokenBundle("oversized-entry-header", _oversized_header(workdir / "oversized-entry-header.ekb", good), Check.SIZE_LIMIT))

    valid = workdir / "valid.ekb"
    truncated = workdir / "truncated.ekb"
    data = valid.read_bytes()
    model_at = data.index(model)  # cut in the middle of the last entry's data
    truncated.write_bytes(data[: model_at + len(model) // 2])
    cases.append(BrokenBundle("truncated-archive", truncated, Check.ARCHIVE))
    garbage = workdir / "not-a-tar.ekb"
    garbage.write_bytes(b"\x7fELF" + bytes(range(256)) * 8)
    cases.append(BrokenBundle("not-an-archive", garbage, Check.ARCHIVE))
    return cases


def _oversized_header(path: Path, good: list[Entry]) -> Path:
    """A gzip tar whose entry header claims 5 GiB (over the default 4 GiB limit) with little data behind it."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for entry in good:
            archive.addfile(entry.info(), io.BytesIO(entry.data))
        info = tarfile.TarInfo("huge.bin")
        info.size = 5 << 30
        buffer.write(info.tobuf(tarfile.PAX_FORMAT))
        buffer.write(bytes(1 << 16))
        archive.fileobj = io.BytesIO()  # the archive's own end markers must not land after the fake entry
    path.write_bytes(gzip.compress(buffer.getvalue(), compresslevel=1))
    return path


# --------------------------------------------------------------------------- a text bundle


def write_tiny_text_bundle(out: Path, key: Ed25519PrivateKey, version: str = "1.0.0") -> Manifest:
    """A signed text-classification bundle: an untrained tiny BERT (vocabulary of all-MiniLM-L6-v2, 2 token types,
    128 positions) with the real tokenizer at max_length 64, and its inputs' value ranges as the package pass records them."""
    import onnx
    import onnxruntime

    from device_agent.bundle import TokenizerPreprocessing
    from edgekit.passes.package import _tensor_specs, index_ranges
    from tests.support.tiny_bert import MAX_LENGTH, _tiny_classifier, export_hf_classifier, minilm_tokenizer_file

    payload_dir = out.parent / f"{out.stem}-payload"
    payload_dir.mkdir(parents=True, exist_ok=True)
    model_path = export_hf_classifier(_tiny_classifier(len(LABELS), 32, 2).eval(), payload_dir / "model.onnx")
    graph = onnx.load(str(model_path)).graph
    feeds = {"input_ids": np.array([[101, 2023, 102]]), "attention_mask": np.ones((1, 3), np.int64), "token_type_ids": np.zeros((1, 3), np.int64)}
    (logits,) = onnxruntime.InferenceSession(str(model_path), providers=["CPUExecutionProvider"]).run(None, feeds)
    golden = payload_dir / "golden.npz"
    np.savez(golden, **{f"input:{name}": value for name, value in feeds.items()}, **{"output:logits": logits})
    manifest = tiny_manifest(version).model_copy(update={
        "model": ModelInfo(name="tiny-text", version=version),
        "inputs": _tensor_specs(graph.input, index_ranges(graph)),
        "outputs": _tensor_specs(graph.output),
        "task": TaskInfo(kind="text-classification", labels=LABELS),
        "preprocessing": TokenizerPreprocessing(tokenizer_file="tokenizer.json", max_length=MAX_LENGTH),
    })
    payload = {"model.onnx": model_path, "golden.npz": golden, "tokenizer.json": minilm_tokenizer_file()}
    return write_bundle(out, manifest, payload, key)


# --------------------------------------------------------------------------- a table bundle

TABLE_LABELS = ["low", "medium", "high"]


def tiny_table_spec():
    """Two numeric columns (training medians as fills) and one categorical: features [age, hours, job one-hot + other]."""
    from device_agent.bundle import TableColumn, TablePreprocessing

    return TablePreprocessing(columns=[
        TableColumn(name="age", kind="numeric", fill=40.0),
        TableColumn(name="hours per week", kind="numeric", fill=38.0),
        TableColumn(name="job", kind="categorical", categories=["technician", "clerk", "manager"]),
    ])


def tiny_table_rows(count: int, seed: int = 0, age_shift: float = 0.0) -> list[dict]:
    """Raw rows for the tiny table model: ages around 40 (+ ``age_shift``), hours around 38, mostly known jobs."""
    rng = np.random.default_rng(seed)
    jobs = ["technician", "clerk", "manager", "artist"]
    return [{"age": float(round(rng.normal(40 + age_shift, 10), 1)), "hours per week": float(round(rng.normal(38, 6), 1)),
             "job": jobs[int(rng.choice(4, p=[0.4, 0.3, 0.25, 0.05]))]} for _ in range(count)]


def write_table_classifier(path: Path, width: int, seed: int = 0) -> Path:
    """A real ONNX model over encoded table rows: logits = features @ W + b (normalisation folded into W), three classes."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weight = rng.normal(size=(width, len(TABLE_LABELS))).astype(np.float32) * 0.1
    weight[0] = [-0.2, 0.0, 0.2]  # age: older rows lean "high"
    bias = numpy_helper.from_array(np.array([8.0, 0.0, -8.0], np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["features", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["logits"])],
        "tiny-table",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", len(TABLE_LABELS)])],
        initializer=[numpy_helper.from_array(weight, "W"), bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def write_tiny_table_bundle(out: Path, key: Ed25519PrivateKey, version: str = "1.0.0", *,
                            drift_reference: dict | None = None) -> Manifest:
    """A signed tabular-classification bundle ("tiny-table"): ``tiny_table_spec`` columns, one MatMul+Add model over the
    ``features`` input, golden vectors from ONNX Runtime on rows encoded by ``TableEncoder``. Its model file is
    ``<out.parent>/<out.stem>-payload/model.onnx``."""
    import onnxruntime

    from device_agent.preprocess import TableEncoder

    spec = tiny_table_spec()
    payload_dir = out.parent / f"{out.stem}-payload"
    payload_dir.mkdir(parents=True, exist_ok=True)
    model_path = write_table_classifier(payload_dir / "model.onnx", spec.width)
    features = TableEncoder(spec)(tiny_table_rows(4, seed=1) + [{"age": None, "job": "pilot"}])
    (logits,) = onnxruntime.InferenceSession(str(model_path), providers=["CPUExecutionProvider"]).run(None, {"features": features})
    golden = payload_dir / "golden.npz"
    np.savez(golden, **{"input:features": features, "output:logits": logits})
    manifest = tiny_manifest(version).model_copy(update={
        "model": ModelInfo(name="tiny-table", version=version),
        "inputs": [TensorSpec(name="features", datatype="FP32", shape=["batch", spec.width])],
        "outputs": [TensorSpec(name="logits", datatype="FP32", shape=["batch", len(TABLE_LABELS)])],
        "task": TaskInfo(kind="tabular-classification", labels=TABLE_LABELS),
        "preprocessing": spec,
        "drift_reference": drift_reference,
    })
    return write_bundle(out, manifest, {"model.onnx": model_path, "golden.npz": golden}, key)


# --------------------------------------------------------------------------- a spectral (time-series features) bundle

SPECTRAL_LABELS = ["idle", "walk", "run"]


def tiny_spectral_spec():
    """Three channels of 32 steps, 4 bands: features [channel 0: mean, std, RMS, skewness, kurtosis, 4 bands, channel 1 …]."""
    from device_agent.bundle import SpectralPreprocessing

    return SpectralPreprocessing(channels=3, steps=32, bands=4)


def tiny_spectral_windows(count: int, seed: int = 0, offset: float = 0.0) -> np.ndarray:
    """FP32 windows ``[count, 3, 32]`` for the tiny spectral model: a sine per channel at a random frequency and phase,
    plus noise; channel 0 shifted by ``offset``."""
    rng = np.random.default_rng(seed)
    spec = tiny_spectral_spec()
    steps = np.arange(spec.steps)
    cycles = rng.integers(1, spec.steps // 2, size=(count, spec.channels, 1))
    phase = rng.uniform(0, 2 * np.pi, size=(count, spec.channels, 1))
    windows = np.sin(2 * np.pi * cycles * steps / spec.steps + phase) + rng.normal(0, 0.3, size=(count, spec.channels, spec.steps))
    windows[:, 0] += offset
    return windows.astype(np.float32)


def write_spectral_classifier(path: Path, width: int, seed: int = 0) -> Path:
    """A real ONNX model over spectral features: logits = features @ W + b, three classes."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weight = numpy_helper.from_array(rng.normal(size=(width, len(SPECTRAL_LABELS))).astype(np.float32) * 0.3, "W")
    bias = numpy_helper.from_array(rng.normal(size=(len(SPECTRAL_LABELS),)).astype(np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["features", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["logits"])],
        "tiny-spectral",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", len(SPECTRAL_LABELS)])],
        initializer=[weight, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def write_tiny_spectral_bundle(out: Path, key: Ed25519PrivateKey, version: str = "1.0.0", *,
                               drift_reference: dict | None = None) -> Manifest:
    """A signed spectral bundle ("tiny-spectral"): ``tiny_spectral_spec`` windows, one MatMul+Add model over the
    ``features`` input, golden vectors from ONNX Runtime on ``spectral_features`` of a few windows. Its model file is
    ``<out.parent>/<out.stem>-payload/model.onnx``."""
    import onnxruntime

    from device_agent.preprocess import spectral_features

    spec = tiny_spectral_spec()
    payload_dir = out.parent / f"{out.stem}-payload"
    payload_dir.mkdir(parents=True, exist_ok=True)
    model_path = write_spectral_classifier(payload_dir / "model.onnx", spec.width)
    features = spectral_features(tiny_spectral_windows(4, seed=1), spec.bands)
    (logits,) = onnxruntime.InferenceSession(str(model_path), providers=["CPUExecutionProvider"]).run(None, {"features": features})
    golden = payload_dir / "golden.npz"
    np.savez(golden, **{"input:features": features, "output:logits": logits})
    manifest = tiny_manifest(version).model_copy(update={
        "model": ModelInfo(name="tiny-spectral", version=version),
        "inputs": [TensorSpec(name="features", datatype="FP32", shape=["batch", spec.width])],
        "outputs": [TensorSpec(name="logits", datatype="FP32", shape=["batch", len(SPECTRAL_LABELS)])],
        "task": TaskInfo(kind="tensor", labels=SPECTRAL_LABELS),
        "preprocessing": spec,
        "drift_reference": drift_reference,
    })
    return write_bundle(out, manifest, {"model.onnx": model_path, "golden.npz": golden}, key)


# --------------------------------------------------------------------------- an image bundle


TINY_IMAGE_SPEC = ImagePreprocessing(resize=8, crop=(8, 8), channel_order="RGB", layout="NCHW", mean=[0.5, 0.5, 0.5],
                                     std=[0.25, 0.25, 0.25])


def write_tiny_image_bundle(out: Path, key) -> None:
    """A signed image bundle "tiny-cnn": Conv, ReLU, global pooling and a dense layer over 8x8 RGB crops."""
    import onnx
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper

    from device_agent.preprocess import ImagePreprocessor

    payload = out.parent / f"{out.stem}-payload"
    payload.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("Conv", ["pixels", "W"], ["conv"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["conv"], ["relu"]), helper.make_node("GlobalAveragePool", ["relu"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"]), helper.make_node("Gemm", ["flat", "D", "c"], ["logits"])]
    weights = [numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "W"),
               numpy_helper.from_array(rng.normal(size=(4, 3)).astype(np.float32), "D"),
               numpy_helper.from_array(rng.normal(size=(3,)).astype(np.float32), "c")]
    graph = helper.make_graph(nodes, "tiny-cnn", [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])], initializer=weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, payload / "model.onnx")
    pixels = ImagePreprocessor(TINY_IMAGE_SPEC)(rng.integers(0, 256, size=(2, 10, 12, 3), dtype=np.uint8))
    (logits,) = onnxruntime.InferenceSession(str(payload / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"pixels": pixels})
    np.savez(payload / "golden.npz", **{"input:pixels": pixels, "output:logits": logits})
    manifest = tiny_manifest().model_copy(update={
        "model": ModelInfo(name="tiny-cnn", version="1.0.0"),
        "inputs": [TensorSpec(name="pixels", datatype="FP32", shape=["batch", 3, 8, 8])],
        "outputs": [TensorSpec(name="logits", datatype="FP32", shape=["batch", 3])],
        "task": TaskInfo(kind="image-classification", labels=["a", "b", "c"]),
        "preprocessing": TINY_IMAGE_SPEC,
    })
    write_bundle(out, manifest, {"model.onnx": payload / "model.onnx", "golden.npz": payload / "golden.npz"}, key)
