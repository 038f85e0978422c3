"""What every task's data becomes: raw inputs and labels per split, and the seeded split they share.

A task reads its own formats (``edgekit.tasks.text_data`` for labelled texts,
``edgekit.tasks.image_data`` for images) into a :class:`TaskData`: train, val,
test and calibration :class:`Split` s of raw model inputs (texts, uint8 images,
float rows...) with int64 labels, and a digest of their content that is part of
the cache key of every pass that uses data. Data without a split of its own is
split by :func:`assign_splits`: stratified 70/10/20 per class by a content hash,
so the same rows give the same split on every machine and in any order.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from edgekit.errors import EdgekitError

SPLITS = ("train", "val", "test")
MIN_CALIBRATION_ROWS = 16
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val", "test": "test"}
# Per class: this share goes to test and val (at least one row each), the rest to train.
TEST_TENTHS, VAL_TENTHS = 2, 1
MIN_ROWS_TO_SPLIT = 3  # a class with fewer rows stays whole in train


class DataError(EdgekitError):
    """The build's data cannot be used as it is."""


@dataclass(frozen=True)
class Split:
    """Raw model inputs with their labels: texts (a tuple of str), images (uint8 ``[n, height, width, channels]``),
    series (float32 ``[n, channels, steps]``) or table rows (an object array of dicts, column → value)."""

    inputs: "tuple[str, ...] | np.ndarray"
    labels: np.ndarray  # int64 class indices into TaskData.labels

    def __len__(self) -> int:
        return len(self.inputs)

    @property
    def texts(self) -> tuple[str, ...]:
        if not isinstance(self.inputs, tuple):
            raise TypeError("this split holds images, not texts; encode it with edgekit.tasks.model_feeds")
        return self.inputs

    def head(self, count: int) -> "Split":
        """The first ``count`` rows (splits are stored in a fixed, stratified order)."""
        return Split(self.inputs[:count], self.labels[:count])

    def subset(self, rows: "np.ndarray") -> "Split":
        """The rows at the indices ``rows``, in that order."""
        inputs = tuple(self.inputs[i] for i in rows) if isinstance(self.inputs, tuple) else self.inputs[rows]
        return Split(inputs, self.labels[rows])


@dataclass(frozen=True)
class TaskData:
    labels: tuple[str, ...]
    train: Split
    val: Split
    test: Split
    calibration: Split
    digest: str  # content hash of the rows: part of the cache key of every pass that uses data
    # What the report says about the data: source, rows read/kept, drops by reason, class balance per split.
    summary: dict = field(default_factory=dict)


def stratified_order(texts: list[str], labels: list[int]) -> tuple[tuple[str, ...], np.ndarray]:
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


@dataclass(frozen=True)
class Example:
    """One clean labelled text: non-empty text, normalised label, split in SPLITS."""

    text: str
    label: str
    split: str


def rank(seed: int, example: Example) -> str:
    # Content hash, not random: the same rows give the same split on every machine and in any order.
    return hashlib.sha256(f"{seed}:split:{example.label}:{example.text}".encode()).hexdigest()


def assign_splits(examples: list[Example], seed: int) -> tuple[list[Example], list[str]]:
    """Stratified 70/10/20 per class, by hash rank; classes under MIN_ROWS_TO_SPLIT rows go to train whole."""
    by_class: dict[str, list[Example]] = {}
    for example in examples:
        by_class.setdefault(example.label, []).append(example)
    split_of: dict[Example, str] = {}
    warnings = []
    for label in sorted(by_class):
        members = by_class[label]
        if len(members) < MIN_ROWS_TO_SPLIT:
            warnings.append(f"class {label!r} has {len(members)} row(s), fewer than {MIN_ROWS_TO_SPLIT}: all in train, none in val / test")
            split_of.update((example, "train") for example in members)
            continue
        ranked = sorted(members, key=lambda example: rank(seed, example))
        n_test = max(1, (len(ranked) * TEST_TENTHS + 5) // 10)
        n_val = max(1, (len(ranked) * VAL_TENTHS + 5) // 10)
        split_of.update((example, "test") for example in ranked[:n_test])
        split_of.update((example, "val") for example in ranked[n_test : n_test + n_val])
        split_of.update((example, "train") for example in ranked[n_test + n_val :])
    return [Example(example.text, example.label, split_of[example]) for example in examples], warnings


def class_balance(split: tuple[Example, ...] | list[Example]) -> dict[str, int]:
    """Rows per label, labels sorted."""
    counts = Counter(example.label for example in split)
    return {label: counts[label] for label in sorted(counts)}


def interleave_classes(labels: np.ndarray) -> np.ndarray:
    """Row order interleaving the classes round robin, so any prefix (calibration, quick evaluation) is roughly stratified."""
    rank = np.zeros(len(labels), dtype=np.int64)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        rank[members] = np.arange(len(members))
    return np.lexsort((labels, rank))


def carve_stratified(labels: np.ndarray, share: float, seed: int) -> np.ndarray:
    """Boolean mask of the rows held out (for validation or test): ``share`` of each class, chosen by a seeded permutation."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        mask[members[: max(1, round(len(members) * share))]] = True
    return mask


def checked_labels(parts: dict[str, tuple[object, list[str]]], declared: list[str], source: str, noun: str,
                   empty_fix: str) -> tuple[str, ...]:
    """The labels, in ``declared`` order where the data names one (else sorted), once train has at least two classes and
    val and test hold rows, all of classes train has; otherwise a DataError naming ``source`` and the fix."""
    present = set(parts["train"][1])
    if len(present) < 2:
        raise DataError(f"{source}: train has {len(present)} class(es) {sorted(present)}; classification needs at least 2")
    labels = tuple(label for label in declared if label in present) or tuple(sorted(present))
    for name in ("val", "test"):
        strangers = sorted(set(parts[name][1]) - present)
        if strangers:
            raise DataError(f"{source}: {name} has class(es) {strangers} that train does not; the model cannot learn them: "
                            f"add training {noun} of those classes")
        if not parts[name][1]:
            raise DataError(f"{source}: the {name} split is empty; {empty_fix.format(split=name)}")
    return labels


def _content_bytes(inputs: np.ndarray) -> bytes:
    """The rows' content as bytes: an array's buffer, or for objects (table rows: dicts) their canonical JSON, since an
    object array's buffer holds addresses."""
    if inputs.dtype == object:
        import json

        return json.dumps(inputs.tolist(), sort_keys=True, default=str).encode()
    return np.ascontiguousarray(inputs).tobytes()


def task_data_from(labels: tuple[str, ...], parts: dict[str, tuple[np.ndarray, list[str]]], calibration_rows: int,
                   identity: bytes, summary: dict) -> TaskData:
    """Raw inputs and label names per split (train, val, test) → TaskData: classes interleaved (any prefix is roughly
    stratified), calibration = the first ``calibration_rows`` of train, a digest of ``identity`` (what else defines the
    rows, e.g. the preprocessing) and every row, and the class balance per split added to ``summary``."""
    index = {label: i for i, label in enumerate(labels)}
    splits: dict[str, Split] = {}
    for name in SPLITS:
        inputs, names = parts[name]
        targets = np.asarray([index[n] for n in names], dtype=np.int64)
        order = interleave_classes(targets)
        splits[name] = Split(np.ascontiguousarray(inputs[order]), targets[order])
    calibration = splits["train"].head(calibration_rows)
    digest = hashlib.sha256(identity)
    for name, split in (*splits.items(), ("calibration", calibration)):
        digest.update(name.encode())
        digest.update(_content_bytes(split.inputs))
        digest.update(split.labels.tobytes())
    balance = {name: {label: int(np.sum(splits[name].labels == i)) for i, label in enumerate(labels)} for name in SPLITS}
    return TaskData(labels, splits["train"], splits["val"], splits["test"], calibration, digest.hexdigest(),
                    {**summary, "balance": balance})
