"""Captured samples → a dataset file ``edgekit build`` reads: the retraining loop's first step.

Text: JSONL rows ``{"text", "label", "captured_at"}`` (``edgekit.tasks.text_data`` reads the
text and label columns; a sample without a predicted label gets ``label: null``,
which the build's cleaning counts and drops). Images: one sub-folder per label
with PNG files, the layout image datasets use. Labels are the model's own
predictions: pseudo-labels for a person to review, not ground truth.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from device_agent.telemetry_schema import CapturedSample
from edgekit.fleet.store import FleetError

UNLABELLED = "_unlabelled"
_UNSAFE = re.compile(r"[^A-Za-z0-9._ -]+")


@dataclass(frozen=True)
class Exported:
    kind: str  # "text" | "image"
    count: int
    unlabelled: int


def export_samples(samples: list[CapturedSample], out: Path, *, device: str, force: bool = False) -> Exported:
    """Write ``samples`` to ``out`` (a .jsonl file for texts, a folder for images)."""
    if not samples:
        raise FleetError(
            f"device {device!r} has no captured samples; turn on sampled capture on its agent, "
            "let it serve traffic, and export again"
        )
    texts = [sample for sample in samples if sample.text is not None]
    images = [sample for sample in samples if sample.image is not None]
    if texts and images:
        raise FleetError(f"device {device!r} captured both texts and images; a dataset holds one kind")
    if out.exists() and not force:
        raise FleetError(f"--out {out} exists; choose a new path or pass --force to replace it")
    if texts:
        if out.suffix.lower() not in (".jsonl", ".ndjson"):
            raise FleetError(f"--out {out}: text samples are written as JSONL; name the file {out.with_suffix('.jsonl').name}")
        return _write_texts(texts, out)
    return _write_images(images, out)


def _write_texts(samples: list[CapturedSample], out: Path) -> Exported:
    from device_agent.files import write_atomically

    lines = [json.dumps({"text": s.text, "label": s.predicted, "captured_at": s.captured_at}, ensure_ascii=False) for s in samples]
    write_atomically(out, ("\n".join(lines) + "\n").encode("utf-8"))
    return Exported("text", len(samples), sum(1 for s in samples if s.predicted is None))


def _write_images(samples: list[CapturedSample], out: Path) -> Exported:
    import numpy as np
    from PIL import Image

    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    counts: dict[str, int] = {}
    for sample in samples:
        assert sample.image is not None
        shape = tuple(sample.image.shape)
        pixels = np.frombuffer(base64.b64decode(sample.image.data_base64), dtype=np.uint8)
        if pixels.size != int(np.prod(shape)):
            raise FleetError(f"a captured image holds {pixels.size} bytes but its shape {list(shape)} needs {int(np.prod(shape))}")
        array = pixels.reshape(shape)
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        label = (_UNSAFE.sub("_", sample.predicted).strip(" .") if sample.predicted else "") or UNLABELLED
        folder = staging / label
        folder.mkdir(parents=True, exist_ok=True)
        index = counts.get(label, 0)
        counts[label] = index + 1
        Image.fromarray(array).save(folder / f"{index:06d}.png")
    # The finished folder appears at once: a reader never sees half an export.
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    staging.rename(out)
    return Exported("image", len(samples), counts.get(UNLABELLED, 0))
