"""The malicious-bundle corpus: every broken bundle is refused for the right reason, leaving nothing behind."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from device_agent.bundle import BundleError, open_bundle, read_manifest_unverified
from device_agent.keys import Keyring, generate_keypair, load_private_key
from edgekit.cli import app
from tests.support.bundles import build_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    generate_keypair(root / "keys")
    keyring = root / "keyring"
    keyring.mkdir()
    (keyring / "trusted.pub").write_bytes((root / "keys" / "edgekit.pub").read_bytes())
    cases = build_corpus(root / "bundles", load_private_key(root / "keys" / "edgekit.key"), Ed25519PrivateKey.generate())
    return root, keyring, {case.name: case for case in cases}


CASE_NAMES = [
    "manifest-byte-flip", "model-byte-flip", "missing-signature", "malformed-signature", "untrusted-key",
    "missing-manifest", "file-listed-but-missing", "file-present-but-unlisted", "wrong-size",
    "reference-to-absent-file", "dotdot-entry", "nested-dotdot-entry", "absolute-entry", "symlink-entry",
    "hardlink-entry", "device-entry", "fifo-entry", "directory-entry", "duplicate-entry", "manifest-not-json",
    "unknown-schema-version", "manifest-schema-violation", "gzip-bomb-entry", "gzip-bomb-total",
    "too-many-entries", "oversized-entry-header", "truncated-archive", "not-an-archive",
]


def test_corpus_has_every_case(corpus):
    _, _, cases = corpus
    assert sorted(cases) == sorted(CASE_NAMES)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_each_broken_bundle_is_refused_for_its_reason(corpus, tmp_path, name):
    root, keyring_dir, cases = corpus
    case = cases[name]
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with pytest.raises(BundleError) as raised:
        open_bundle(case.path, Keyring.load(keyring_dir), limits=case.limits, scratch_dir=scratch)
    assert raised.value.check is case.check, str(raised.value)
    assert case.check.value in str(raised.value)
    assert list(scratch.iterdir()) == [], "a refused bundle must leave nothing in the scratch dir"
    assert not (scratch.parent / "escaped").exists()
    assert not Path("/tmp/edgekit-escaped").exists()


def test_the_valid_bundle_of_the_corpus_verifies(corpus):
    root, keyring_dir, _ = corpus
    with open_bundle(root / "bundles" / "valid.ekb", Keyring.load(keyring_dir)) as bundle:
        assert bundle.manifest.model.name == "tiny-classifier"


# Cases whose limits are the defaults, so the CLI (default limits) must refuse them too.
CLI_CASES = [name for name in CASE_NAMES if name not in ("gzip-bomb-entry", "gzip-bomb-total", "too-many-entries")]


@pytest.mark.parametrize("name", CLI_CASES)
def test_cli_verify_exits_nonzero_naming_the_check(corpus, name):
    _, keyring_dir, cases = corpus
    case = cases[name]
    result = CliRunner().invoke(app, ["bundle", "verify", str(case.path), "--keyring", str(keyring_dir)])
    assert result.exit_code == 2, result.output
    assert f"[{case.check.value}]" in result.stderr
    assert "Traceback" not in result.output + result.stderr


@pytest.mark.parametrize("name", ["symlink-entry", "dotdot-entry", "not-an-archive", "manifest-not-json"])
def test_inspect_refuses_unsafe_archives_too(corpus, name):
    _, _, cases = corpus
    with pytest.raises(BundleError):
        read_manifest_unverified(cases[name].path)
