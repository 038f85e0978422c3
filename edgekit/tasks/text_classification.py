"""Text classification: the labelled data a build uses, read from JSONL, and how texts become tensors.

Rows carry a text, a label and a split (train / val / test). Calibration rows
come from their own file or, without one, from train. Tokenization is
``device_agent.preprocess.TextTokenizer``: the same code a device runs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgekit.config import DataSection
from edgekit.errors import EdgekitError

SPLITS = ("train", "val", "test")
MIN_CALIBRATION_ROWS = 16


class DataError(EdgekitError):
    """The build's data cannot be used as it is."""


@dataclass(frozen=True)
class Split:
    texts: tuple[str, ...]
    labels: np.ndarray  # int64 class indices into TaskData.labels

    def __len__(self) -> int:
        return len(self.texts)

    def head(self, count: int) -> "Split":
        """The first ``count`` rows (splits are stored in a fixed, stratified order)."""
        return Split(self.texts[:count], self.labels[:count])


@dataclass(frozen=True)
class TaskData:
    labels: tuple[str, ...]
    train: Split
    val: Split
    test: Split
    calibration: Split
    digest: str  # content hash of the rows: part of the cache key of every pass that uses data


def _read_jsonl(path: Path, columns: DataSection) -> list[dict]:
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; set data.path in the build config")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number} is not JSON ({exc.msg}); each line must be one JSON object") from None
            missing = [c for c in (columns.text_column, columns.label_column) if c not in row]
            if missing:
                raise DataError(f"{path}:{number} has no {missing} column; name the columns with data.text_column / data.label_column")
            rows.append(row)
    if not rows:
        raise DataError(f"data file {path} holds no rows")
    return rows


def _stratified_order(texts: list[str], labels: list[int]) -> tuple[tuple[str, ...], np.ndarray]:
    """Interleave classes (round robin, stable) so that any prefix is roughly stratified."""
    by_class: dict[int, list[str]] = {}
    for text, label in zip(texts, labels, strict=True):
        by_class.setdefault(label, []).append(text)
    order: list[tuple[str, int]] = []
    for index in range(max((len(v) for v in by_class.values()), default=0)):
        for label in sorted(by_class):
            if index < len(by_class[label]):
                order.append((by_class[label][index], label))
    return tuple(t for t, _ in order), np.asarray([label for _, label in order], dtype=np.int64)


def load_task_data(columns: DataSection) -> TaskData:
    """Read, check and split the build's labelled texts."""
    rows = _read_jsonl(columns.path, columns)
    split_of = [str(row.get(columns.split_column, "")) for row in rows]
    unknown = sorted(set(split_of) - set(SPLITS))
    if unknown:
        raise DataError(f"{columns.path}: split values {unknown} are not train/val/test")
    train_labels = sorted({str(row[columns.label_column]) for row, split in zip(rows, split_of) if split == "train"})
    if len(train_labels) < 2:
        raise DataError(f"{columns.path}: train has {len(train_labels)} class(es); classification needs at least 2")
    index = {label: position for position, label in enumerate(train_labels)}
    splits = {}
    for name in SPLITS:
        chosen = [(str(row[columns.text_column]), str(row[columns.label_column])) for row, split in zip(rows, split_of) if split == name]
        strangers = sorted({label for _, label in chosen} - set(index))
        if strangers:
            raise DataError(f"{columns.path}: {name} has labels {strangers} that train does not; the model cannot learn them")
        if not chosen:
            raise DataError(f"{columns.path}: the {name} split is empty")
        splits[name] = Split(*_stratified_order([t for t, _ in chosen], [index[label] for _, label in chosen]))
    if columns.calibration_path is not None:
        calibration_rows = _read_jsonl(columns.calibration_path, columns)
        texts = [str(row[columns.text_column]) for row in calibration_rows]
        calibration = Split(*_stratified_order(texts, [index.get(str(row[columns.label_column]), 0) for row in calibration_rows]))
    else:
        calibration = splits["train"].head(256)
    if len(calibration) < MIN_CALIBRATION_ROWS:
        raise DataError(f"calibration set has {len(calibration)} rows; quantization needs at least {MIN_CALIBRATION_ROWS}")
    digest = hashlib.sha256()
    for path in filter(None, (columns.path, columns.calibration_path)):
        digest.update(path.read_bytes())
    digest.update(json.dumps(columns.model_dump(mode="json", exclude={"path", "calibration_path"}), sort_keys=True).encode())
    return TaskData(tuple(train_labels), splits["train"], splits["val"], splits["test"], calibration, digest.hexdigest())
