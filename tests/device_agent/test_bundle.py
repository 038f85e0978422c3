"""Writing and verifying bundles: the round trip, atomic writes, and the temp-dir discipline."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest

from device_agent.bundle import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    BundleError,
    Check,
    Manifest,
    ModelInfo,
    canonical_manifest_bytes,
    open_bundle,
    read_manifest_unverified,
    write_bundle,
)
from tests.support.bundles import tiny_manifest, tiny_payload, write_tiny_bundle


def test_round_trip_verifies_and_unpacks_every_file(tmp_path, signing_key, keyring):
    out = tmp_path / "out" / "tiny.ekb"
    written = write_tiny_bundle(out, signing_key)
    payload_dir = tmp_path / "out" / "tiny-payload"

    with open_bundle(out, keyring) as bundle:
        assert bundle.manifest == written
        assert bundle.signer in keyring.keys
        for entry in written.files:
            assert bundle.path(entry.path).read_bytes() == (payload_dir / entry.path).read_bytes()
        golden = np.load(bundle.path("golden.npz"))
        assert golden["output:logits"].shape == (2, 3)
        root = bundle.root
    assert not root.exists(), "the unpacked bundle must be removed on exit"


def test_manifest_lists_hash_and_size_of_every_payload_file(tmp_path, signing_key):
    written = write_tiny_bundle(tmp_path / "tiny.ekb", signing_key)
    assert sorted(entry.path for entry in written.files) == ["golden.npz", "model.onnx"]
    model = tmp_path / "tiny-payload" / "model.onnx"
    entry = next(entry for entry in written.files if entry.path == "model.onnx")
    assert entry.size == model.stat().st_size
    import hashlib

    assert entry.sha256 == hashlib.sha256(model.read_bytes()).hexdigest()


def test_archive_holds_manifest_first_then_signature_then_files(tmp_path, signing_key):
    out = tmp_path / "tiny.ekb"
    written = write_tiny_bundle(out, signing_key)
    with tarfile.open(out) as archive:
        names = archive.getnames()
        manifest_bytes = archive.extractfile(MANIFEST_NAME).read()
    assert names == [MANIFEST_NAME, SIGNATURE_NAME, "golden.npz", "model.onnx"]
    assert manifest_bytes == canonical_manifest_bytes(written)
    document = json.loads(manifest_bytes)
    for field in ("schema_version", "model", "created_at", "target", "runtime", "precision", "inputs", "outputs",
                  "task", "preprocessing", "metrics", "golden", "drift_reference", "files"):
        assert field in document


def test_write_leaves_no_partial_file_when_it_fails(tmp_path, signing_key):
    payload = tiny_payload(tmp_path / "payload")
    del payload["golden.npz"]
    with pytest.raises(BundleError) as raised:
        write_bundle(tmp_path / "out.ekb", tiny_manifest(), payload, signing_key)
    assert raised.value.check is Check.MANIFEST_REFERENCE
    assert "golden.file" in str(raised.value)
    assert list(tmp_path.glob("*.ekb*")) == []


@pytest.mark.parametrize("name", ["../x", "/abs", "a//b", "./a", "manifest.json", "manifest.sig", "a\\b"])
def test_write_refuses_unsafe_or_reserved_names(tmp_path, signing_key, name):
    payload = tiny_payload(tmp_path / "payload")
    payload[name] = payload["model.onnx"]
    with pytest.raises(BundleError) as raised:
        write_bundle(tmp_path / "out.ekb", tiny_manifest(), payload, signing_key)
    assert raised.value.check is Check.ENTRY_PATH


def test_rewriting_replaces_the_bundle_atomically(tmp_path, signing_key, keyring):
    out = tmp_path / "tiny.ekb"
    write_tiny_bundle(out, signing_key, version="1.0.0")
    write_tiny_bundle(out, signing_key, version="1.0.1")
    with open_bundle(out, keyring) as bundle:
        assert bundle.manifest.model.version == "1.0.1"
    assert [path.name for path in tmp_path.iterdir() if path.is_file()] == ["tiny.ekb"]


def test_gzip_compressed_bundle_is_read_too(tmp_path, signing_key, keyring):
    import gzip

    plain = tmp_path / "tiny.ekb"
    write_tiny_bundle(plain, signing_key)
    compressed = tmp_path / "tiny-gz.ekb"
    compressed.write_bytes(gzip.compress(plain.read_bytes()))
    with open_bundle(compressed, keyring) as bundle:
        assert bundle.manifest.model.name == "tiny-classifier"


def test_inspect_reads_manifest_without_unpacking(tmp_path, signing_key):
    out = tmp_path / "tiny.ekb"
    written = write_tiny_bundle(out, signing_key)
    manifest, entries = read_manifest_unverified(out)
    assert manifest == written
    assert entries == [MANIFEST_NAME, SIGNATURE_NAME, "golden.npz", "model.onnx"]


def test_verification_uses_a_private_scratch_dir_and_cleans_it(tmp_path, signing_key, keyring):
    out = tmp_path / "tiny.ekb"
    write_tiny_bundle(out, signing_key)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    bundle = open_bundle(out, keyring, scratch_dir=scratch)
    assert bundle.root.is_relative_to(scratch)
    bundle.close()
    assert list(scratch.iterdir()) == []


@pytest.mark.parametrize(("older", "newer"), [("1.9", "1.10"), ("1.0.0", "1.0.1"), ("2", "10"), ("1.2", "1.2.1")])
def test_versions_compare_numerically(older, newer):
    assert ModelInfo(name="m", version=older).version_key() < ModelInfo(name="m", version=newer).version_key()


@pytest.mark.parametrize("version", ["1.0-beta", "", "v1", "1..2"])
def test_non_numeric_versions_are_refused(version):
    with pytest.raises(ValueError):
        ModelInfo(name="m", version=version)


def test_manifest_refuses_unknown_fields_and_naive_timestamps():
    document = tiny_manifest().model_dump()
    with pytest.raises(ValueError, match="Extra inputs"):
        Manifest.model_validate({**document, "surprise": 1})
    with pytest.raises(ValueError, match="time zone"):
        Manifest.model_validate({**document, "created_at": "2026-01-01T00:00:00"})


def test_a_full_disk_while_unpacking_is_the_devices_problem_not_a_corrupt_bundle(tmp_path, signing_key, keyring, monkeypatch):
    import errno

    from device_agent import bundle as bundle_module

    path = tmp_path / "b.ekb"
    write_tiny_bundle(path, signing_key)

    def no_space(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(bundle_module, "_write_entry", no_space)
    with pytest.raises(bundle_module.UnpackFailed, match="No space left on device; free space") as caught:
        bundle_module.open_bundle(path, keyring, scratch_dir=tmp_path)
    assert not isinstance(caught.value, bundle_module.BundleError) and caught.value.status_code == 507
