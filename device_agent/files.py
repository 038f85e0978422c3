"""Files: writing them so that a crash or power cut never leaves half of one, and hashing them in chunks."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def sha256_file(path: Path, chunk: int = 1 << 20) -> tuple[str, int]:
    """The file's SHA-256 (hex) and size, read ``chunk`` bytes at a time (never whole into memory)."""
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable (the folder's own metadata)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(root: Path) -> None:
    """Make every file under ``root``, and every folder's entries, durable: call it before renaming the tree into place,
    so that a power cut after the rename cannot leave the new name pointing at files whose data never reached the disk."""
    for folder, _subfolders, files in os.walk(root, topdown=False):
        for name in files:
            descriptor = os.open(Path(folder) / name, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        fsync_dir(Path(folder))


@contextmanager
def atomic_output(path: Path) -> Iterator[BinaryIO]:
    """A file handle whose content replaces ``path`` only when the block ends without error.

    Written to a temporary file in the same folder, fsynced, renamed over ``path``,
    then the folder is fsynced; on any error the temporary file is removed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old content or the new, never half."""
    with atomic_output(path) as handle:
        handle.write(data)
