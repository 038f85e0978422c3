"""Key pairs and keyrings: permissions, refusal to overwrite, and clear errors for unusable keys."""

from __future__ import annotations

import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from device_agent.keys import Keyring, KeyMaterialError, generate_keypair, key_id, load_private_key


def test_private_key_is_created_owner_only(tmp_path):
    key_path, pub_path = generate_keypair(tmp_path / "keys")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert pub_path.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")


def test_existing_keys_are_not_overwritten_without_force(tmp_path):
    key_path, _ = generate_keypair(tmp_path)
    before = key_path.read_bytes()
    with pytest.raises(KeyMaterialError, match="--force"):
        generate_keypair(tmp_path)
    assert key_path.read_bytes() == before
    generate_keypair(tmp_path, overwrite=True)
    assert key_path.read_bytes() != before


def test_keyring_finds_the_key_by_id(tmp_path):
    key_path, pub_path = generate_keypair(tmp_path / "keys")
    ring_dir = tmp_path / "ring"
    ring_dir.mkdir()
    (ring_dir / "host.pub").write_bytes(pub_path.read_bytes())
    ring = Keyring.load(ring_dir)
    assert list(ring.keys) == [key_id(load_private_key(key_path).public_key())]


def _rsa_pem(private: bool) -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    if private:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "does not exist"), (b"garbage", "not an unencrypted PEM"), ("rsa", "Ed25519")],
)
def test_unusable_private_keys_are_named(tmp_path, content, message):
    path = tmp_path / "edgekit.key"
    if content == "rsa":
        path.write_bytes(_rsa_pem(private=True))
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(KeyMaterialError, match=message) as raised:
        load_private_key(path)
    assert str(path) in str(raised.value)


def test_missing_or_empty_keyring_is_an_error_never_trust_all(tmp_path):
    with pytest.raises(KeyMaterialError, match="not a directory"):
        Keyring.load(tmp_path / "absent")
    with pytest.raises(KeyMaterialError, match="no \\*.pub"):
        Keyring.load(tmp_path)


@pytest.mark.parametrize(("content", "message"), [(b"junk", "not a PEM public key"), ("rsa", "not an Ed25519")])
def test_bad_keyring_files_are_named(tmp_path, content, message):
    bad = tmp_path / "bad.pub"
    bad.write_bytes(_rsa_pem(private=False) if content == "rsa" else content)
    with pytest.raises(KeyMaterialError, match=message) as raised:
        Keyring.load(tmp_path)
    assert "bad.pub" in str(raised.value)
