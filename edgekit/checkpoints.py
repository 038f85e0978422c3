"""Resumable training: one checkpoint per finished epoch, written atomically, newest wins.

A training pass saves its state after each epoch into ``PassContext.checkpoint_dir``
(which outlives an interrupted run of the same pass: same cache key, same
folder). On the next run it resumes from the newest complete checkpoint instead
of starting over. A checkpoint that cannot be read (a crash mid-write leaves
only a temporary file, which is ignored) is skipped, never fatal.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device_agent.files import write_atomically

_NAME = re.compile(r"^epoch-(\d+)\.pt$")


@dataclass(frozen=True)
class Checkpoints:
    """``epoch-N.pt`` files in one folder; ``None`` folder means checkpoints are off."""

    folder: Path | None
    keep: int = 2

    def save(self, epoch: int, state: dict[str, Any]) -> None:
        if self.folder is None:
            return
        import io

        import torch

        self.folder.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save({"epoch": epoch, **state}, buffer)
        write_atomically(self.folder / f"epoch-{epoch}.pt", buffer.getvalue())
        for old in self._epochs()[: -self.keep]:
            (self.folder / f"epoch-{old}.pt").unlink(missing_ok=True)

    def latest(self) -> dict[str, Any] | None:
        """The newest readable checkpoint (with its ``epoch``), or None."""
        if self.folder is None:
            return None
        import torch

        for epoch in reversed(self._epochs()):
            try:
                return torch.load(self.folder / f"epoch-{epoch}.pt", map_location="cpu", weights_only=False)
            except Exception:  # a damaged file: fall back to the one before it
                continue
        return None

    def _epochs(self) -> list[int]:
        if self.folder is None or not self.folder.is_dir():
            return []
        return sorted(int(m.group(1)) for name in os.listdir(self.folder) if (m := _NAME.match(name)))
