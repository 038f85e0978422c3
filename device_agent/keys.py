"""Ed25519 key material: generating key pairs, loading them, and keyrings.

Private keys are PEM (PKCS#8, unencrypted, mode 0600); public keys are PEM
(SubjectPublicKeyInfo). A keyring is a directory of ``*.pub`` files: a device
trusts exactly the keys in its keyring, and there is no "accept anything" mode.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from device_agent.errors import UserError

PRIVATE_KEY_NAME = "edgekit.key"
PUBLIC_KEY_NAME = "edgekit.pub"


class KeyMaterialError(UserError):
    """A key or keyring cannot be used."""


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short, stable name for a public key: the first 16 hex digits of the SHA-256 of its raw bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(out_dir: Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write a new signing key (mode 0600) and its public key into ``out_dir``; return both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    key_path, pub_path = out_dir / PRIVATE_KEY_NAME, out_dir / PUBLIC_KEY_NAME
    if not overwrite:
        for path in (key_path, pub_path):
            if path.exists():
                raise KeyMaterialError(f"{path} already exists; pass --force to replace it, or choose another --out")
    private_key = Ed25519PrivateKey.generate()
    private_pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_private(key_path, private_pem)
    pub_path.write_bytes(public_pem)
    return key_path, pub_path


def _write_private(path: Path, data: bytes) -> None:
    # Create with 0600 from the start: a chmod after writing leaves a window
    # in which the key is world-readable.
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Read an Ed25519 signing key written by ``generate_keypair``."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise KeyMaterialError(f"signing key {path} does not exist; create one with `edgekit keys generate --out DIR`") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise KeyMaterialError(f"{path} is not an unencrypted PEM private key ({exc}); create one with `edgekit keys generate`") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyMaterialError(f"{path} holds a {type(key).__name__}, but bundles are signed with Ed25519 keys; create one with `edgekit keys generate`")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Read one Ed25519 public key (PEM)."""
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise KeyMaterialError(f"keyring file {path} is not a PEM public key ({exc}); remove it or replace it with an edgekit.pub") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyMaterialError(f"keyring file {path} holds a {type(key).__name__}, not an Ed25519 public key; remove it from the keyring")
    return key


@dataclass(frozen=True)
class Keyring:
    """The public keys a device trusts, by key id."""

    directory: Path
    keys: dict[str, Ed25519PublicKey]

    @classmethod
    def load(cls, directory: Path) -> "Keyring":
        """Load every ``*.pub`` in ``directory``; an empty or missing keyring is an error, never "trust all"."""
        if not directory.is_dir():
            raise KeyMaterialError(f"keyring {directory} is not a directory; create it and copy the build host's edgekit.pub into it")
        keys = {key_id(key): key for key in map(load_public_key, sorted(directory.glob("*.pub")))}
        if not keys:
            raise KeyMaterialError(f"keyring {directory} holds no *.pub files; copy the build host's edgekit.pub into it")
        return cls(directory=directory, keys=keys)
