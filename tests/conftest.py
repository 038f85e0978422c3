"""Shared fixtures, and the skip rules for hardware markers (gpu, tensorrt, browser)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.keys import Keyring, generate_keypair, load_private_key


def _cuda_gpu() -> str | None:
    """Why GPU tests cannot run here, or None when a CUDA GPU answers."""
    if shutil.which("nvidia-smi") is None:
        return "no CUDA GPU on this machine (nvidia-smi not found)"
    try:
        subprocess.run(["nvidia-smi", "-L"], check=True, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"nvidia-smi found but no GPU answered ({exc})"
    return None


def _tensorrt() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return "the tensorrt Python package is not installed (pip install edgekit[tensorrt] on a CUDA host)"
    return _cuda_gpu()


def _browser() -> str | None:
    if not any(shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")):
        return "headless Chromium is not installed (apt-get install chromium)"
    return None


_SKIP_RULES = {"gpu": _cuda_gpu, "tensorrt": _tensorrt, "browser": _browser}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reasons: dict[str, str | None] = {}
    for item in items:
        for marker, rule in _SKIP_RULES.items():
            if marker in item.keywords:
                if marker not in reasons:
                    reasons[marker] = rule()
                if reasons[marker]:
                    item.add_marker(pytest.mark.skip(reason=reasons[marker]))


@pytest.fixture
def key_dir(tmp_path: Path) -> Path:
    """A freshly generated key pair (edgekit.key, edgekit.pub)."""
    directory = tmp_path / "keys"
    generate_keypair(directory)
    return directory


@pytest.fixture
def signing_key(key_dir: Path) -> Ed25519PrivateKey:
    return load_private_key(key_dir / "edgekit.key")


@pytest.fixture
def keyring_dir(key_dir: Path, tmp_path: Path) -> Path:
    """A device keyring that trusts exactly the fixture's key."""
    directory = tmp_path / "keyring"
    directory.mkdir()
    shutil.copy(key_dir / "edgekit.pub", directory / "build-host.pub")
    return directory


@pytest.fixture
def keyring(keyring_dir: Path) -> Keyring:
    return Keyring.load(keyring_dir)
