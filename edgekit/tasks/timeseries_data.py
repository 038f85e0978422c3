"""Labelled time series for the time-series task: UCR/UEA ``.ts`` files or NumPy ``.npz``, as float32 [n, channels, steps].

``.ts`` (the UCR/UEA archive's format, as sktime ships it): ``#`` comment
lines, ``@`` header lines (``@dimensions``, ``@equalLength``,
``@seriesLength``, ``@missing``, ``@classLabel true <labels>``), then
``@data`` and one sample a line: each channel's values comma-separated,
channels separated by ``:``, the class label last. ``.npz``: ``X`` shaped
[samples, channels, steps] (or [samples, steps] for one channel) and ``y``.

Equal lengths only for now: a file whose series differ in length, or hold
missing values (``?`` / NaN), is refused with the line that does, since
padding or imputing would change what the device must send. ``data.path`` is
the training file (``sktime:BasicMotions/BasicMotions_TRAIN.ts`` names one
the sktime wheel ships); ``data.test_path`` a held-out test file (as the archive
splits its sets), else a stratified fifth of the data is held out for test.
Validation is a stratified tenth of train (``data.idx.val_share`` does not
apply). Labels keep the order the file declares.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgekit.config import PACKAGED_DATA_PREFIX
from edgekit.data import DataError, TaskData, carve_stratified, checked_labels, task_data_from

CALIBRATION_ROWS = 256
VAL_SHARE = 0.1
TEST_SHARE = 0.2


def resolve_packaged(path: Path) -> Path:
    """``sktime:<data set>/<file>`` is a file the sktime wheel ships under ``sktime/datasets/data`` (read, never imported)."""
    if not str(path).startswith(PACKAGED_DATA_PREFIX):
        return path
    import importlib.util

    spec = importlib.util.find_spec("sktime")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"{path} names a data set of the sktime wheel, which is not installed: pip install sktime "
                        "(only its data files are read)")
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / str(path)[len(PACKAGED_DATA_PREFIX):]


def read_series(path: Path) -> tuple[np.ndarray, list[str], list[str]]:
    """Samples [n, channels, steps] (float32), their labels, and the labels the file declares (in its order)."""
    path = resolve_packaged(path)
    if not path.is_file():
        raise DataError(f"time-series file {path} does not exist; set data.path (and data.test_path) to .ts or .npz files")
    if path.suffix == ".npz":
        return _read_npz(path)
    if path.suffix != ".ts":
        raise DataError(f"{path}: time series are read from .ts (UCR/UEA archive) or .npz files (X [samples, channels, steps], y)")
    return _read_ts(path)


def _read_npz(path: Path) -> tuple[np.ndarray, list[str], list[str]]:
    try:
        with np.load(path, allow_pickle=False) as arrays:
            x, y = arrays["X"], arrays["y"]
    except (KeyError, ValueError, OSError) as problem:
        raise DataError(f"{path}: expected arrays X [samples, channels, steps] and y ({problem})") from None
    if x.ndim == 2:
        x = x[:, None, :]
    if x.ndim != 3 or len(x) != len(y):
        raise DataError(f"{path}: X must be [samples, channels, steps] with one y per sample; got X {list(x.shape)}, y {list(y.shape)}")
    if not np.isfinite(x).all():
        raise DataError(f"{path}: X holds NaN or infinite values; impute or drop those samples first")
    labels = [str(v) for v in y.tolist()]
    return x.astype(np.float32), labels, sorted(set(labels))


def _header(path: Path, lines: list[str]) -> tuple[dict[str, str], int]:
    header: dict[str, str] = {}
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not line.startswith("@"):
            raise DataError(f"{path}:{number}: data before @data; a .ts file has @ header lines, then @data, then one sample a line")
        key, _, value = line[1:].partition(" ")
        if key.lower() == "data":
            return header, number
        header[key.lower()] = value.strip()
    raise DataError(f"{path}: no @data line; is this a UCR/UEA .ts file?")


def _read_ts(path: Path) -> tuple[np.ndarray, list[str], list[str]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as problem:
        raise DataError(f"{path} is not UTF-8 text ({problem.reason} at byte {problem.start})") from None
    header, data_line = _header(path, lines)
    declared = header.get("classlabel", "").split()
    if not declared or declared[0].lower() != "true":
        raise DataError(f"{path}: the header has no '@classLabel true <labels>'; classification needs labelled series")
    if header.get("equallength", "true").lower() != "true":
        raise DataError(f"{path}: series of unequal length (@equalLength false) are not supported yet; resample them to one length")
    samples, labels = [], []
    for number, raw in enumerate(lines[data_line:], start=data_line + 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        *channels, label = line.split(":")
        samples.append(_channels(path, number, channels, samples[0] if samples else None))
        labels.append(label.strip())
    if not samples:
        raise DataError(f"{path}: no samples after @data")
    dimensions = header.get("dimensions")
    if dimensions and int(dimensions) != samples[0].shape[0]:
        raise DataError(f"{path}: the header says @dimensions {dimensions} but the samples have {samples[0].shape[0]} channel(s)")
    return np.stack(samples), labels, declared[1:]


def _channels(path: Path, number: int, channels: list[str], first: np.ndarray | None) -> np.ndarray:
    if not channels:
        raise DataError(f"{path}:{number}: a sample needs its values, then ':' and its label")
    try:
        values = [np.asarray([float(v) for v in channel.split(",")], dtype=np.float32) for channel in channels]
    except ValueError as problem:
        raise DataError(f"{path}:{number}: a value is not a number ({problem}); missing values ('?') are not supported yet") from None
    if len({len(v) for v in values}) != 1 or (first is not None and (len(values), len(values[0])) != first.shape):
        shape = f"{len(values)} channel(s) of lengths {sorted({len(v) for v in values})}"
        expected = f"; the first sample has {first.shape[0]} x {first.shape[1]}" if first is not None else ""
        raise DataError(f"{path}:{number}: {shape}{expected}: every sample must have the same channels and length")
    stacked = np.stack(values)
    if not np.isfinite(stacked).all():
        raise DataError(f"{path}:{number}: NaN or infinite values; missing values are not supported yet")
    return stacked


def load_task_data(path: Path, test_path: Path | None, seed: int = 0) -> TaskData:
    """Read, check and split the build's labelled series (train/val from ``path``, test from ``test_path`` or held out)."""
    x, names, declared = read_series(path)
    if test_path is not None:
        test_x, test_names, _ = read_series(test_path)
        if test_x.shape[1:] != x.shape[1:]:
            raise DataError(f"{test_path} holds series of {list(test_x.shape[1:])} (channels, steps) but {path} of "
                            f"{list(x.shape[1:])}; they must match")
    else:
        held_out = carve_stratified(np.asarray(names), TEST_SHARE, seed)
        test_x, test_names = x[held_out], [n for n, h in zip(names, held_out, strict=True) if h]
        x, names = x[~held_out], [n for n, h in zip(names, held_out, strict=True) if not h]
    order = [label for label in declared if label in set(names)] or sorted(set(names))
    val = carve_stratified(np.asarray([order.index(n) for n in names]), VAL_SHARE, seed)  # classes drawn in label order
    parts = {"train": (x[~val], [n for n, v in zip(names, val, strict=True) if not v]),
             "val": (x[val], [n for n, v in zip(names, val, strict=True) if v]), "test": (test_x, test_names)}
    return _task_data(parts, declared, str(test_path or path), {"source": str(path), "dropped": {}, "warnings": []})


def _task_data(parts: dict[str, tuple[np.ndarray, list[str]]], declared: list[str], where: str, summary: dict) -> TaskData:
    """Series and label names per split → TaskData: labels in the declared order, classes checked, a content digest."""
    labels = checked_labels(parts, declared, where, "series", "add series (or longer recordings)")
    rows = sum(len(names) for _, names in parts.values())
    shape = parts["train"][0].shape
    summary = {"rows_read": rows + sum(summary["dropped"].values()), "rows_kept": rows,
               "series": {"channels": int(shape[1]), "steps": int(shape[2])}, **summary}
    return task_data_from(labels, parts, CALIBRATION_ROWS, repr((labels, shape[1:])).encode(), summary)


# ---------------------------------------------------------------- continuous recordings


def read_recordings(path: Path, label_column: str, recording_column: str | None) -> tuple[list[str], dict[str, tuple[np.ndarray, list[str]]]]:
    """A CSV of samples in time order → its channel names and, per recording, samples [steps, channels] and labels."""
    import csv

    path = resolve_packaged(path)
    if not path.is_file():
        raise DataError(f"recording file {path} does not exist; set data.path to a CSV of samples in time order")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader, None) or []
        for column in (label_column, recording_column):
            if column is not None and column not in header:
                raise DataError(f"{path}: no column {column!r}; the columns are {header} (set data.label_column / "
                                "task.window.recording_column)")
        channels = [c for c in header if c not in (label_column, recording_column)]
        if not channels:
            raise DataError(f"{path}: no channel columns besides the label; every other column is a channel")
        at = {name: header.index(name) for name in header}
        samples: dict[str, tuple[list[list[float]], list[str]]] = {}
        for number, row in enumerate(reader, start=2):
            values = _sample(path, number, row, channels, at, len(header))
            recording = row[at[recording_column]] if recording_column else ""
            samples.setdefault(recording, ([], []))[0].append(values)
            samples[recording][1].append(row[at[label_column]].strip())
    return channels, {name: (np.asarray(rows, np.float32), labels) for name, (rows, labels) in samples.items()}


def _sample(path: Path, number: int, row: list[str], channels: list[str], at: dict[str, int], width: int) -> list[float]:
    if len(row) != width:
        raise DataError(f"{path}:{number}: {len(row)} cells but the header has {width}")
    try:
        values = [float(row[at[channel]]) for channel in channels]
    except ValueError:
        bad = next(channel for channel in channels if not _is_number(row[at[channel]]))
        raise DataError(f"{path}:{number}: column {bad!r} holds {row[at[bad]]!r}, not a number; "
                        "missing values are not supported yet") from None
    if not all(np.isfinite(values)):
        raise DataError(f"{path}:{number}: NaN or infinite values; missing values are not supported yet")
    return values


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def load_windowed(path: Path, window, label_column: str) -> TaskData:
    """Windows of ``window.length`` samples every ``window.step`` cut from each recording's first 70% (train), next 10%
    (val) and last 20% (test), so that no window, and no overlap between windows, spans two splits; a window is kept only
    when every sample in it has the same label (the others are dropped and counted)."""
    channels, recordings = read_recordings(path, label_column, window.recording_column)
    parts: dict[str, tuple[list[np.ndarray], list[str]]] = {name: ([], []) for name in ("train", "val", "test")}
    mixed = 0
    for samples, labels in recordings.values():
        bounds = [0, int(len(samples) * 0.7), int(len(samples) * 0.8), len(samples)]
        for name, start, stop in zip(parts, bounds, bounds[1:], strict=False):
            for first in range(start, stop - window.length + 1, window.step):
                names = set(labels[first:first + window.length])
                if len(names) > 1:
                    mixed += 1
                    continue
                parts[name][0].append(samples[first:first + window.length].T)
                parts[name][1].append(names.pop())
    for name, (windows, _) in parts.items():
        if not windows:
            raise DataError(f"{path}: no {name} window of {window.length} samples with one label; the {name} part of each "
                            f"recording (train 70%, val 10%, test 20%) must hold at least {window.length} samples of one label")
    stacked = {name: (np.stack(windows), names) for name, (windows, names) in parts.items()}
    summary = {"source": str(path), "dropped": {"windows_with_mixed_labels": mixed} if mixed else {},
               "warnings": [], "channel_names": channels, "recordings": len(recordings)}
    return _task_data(stacked, [], str(path), summary)


def channel_statistics(series: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation over samples and steps (of train only: the model normalises with them)."""
    mean = series.mean(axis=(0, 2), dtype=np.float64)
    std = series.std(axis=(0, 2), dtype=np.float64)
    return [float(m) for m in mean], [float(s) if s > 1e-8 else 1.0 for s in std]
