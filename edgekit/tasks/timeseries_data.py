"""Labelled time series for the time-series task, as float32 [n, channels, steps]: UCR/UEA ``.ts``, ``.npz`` or CSV.

Formats (``data.path``; ``data.test_path`` in the same format):

- ``.ts`` (the UCR/UEA archive's format, as sktime ships it): ``#`` comment lines, ``@`` header lines
  (``@dimensions``, ``@equalLength``, ``@seriesLength``, ``@missing``, ``@classLabel true <labels>``), then ``@data``
  and one sample a line: each channel's values comma-separated, channels separated by ``:``, the class label last.
  ``?`` is a missing value (so is ``NaN``, as sktime writes one).
- ``.npz``: ``X`` shaped [samples, channels, steps] (or [samples, steps] for one channel) and ``y``; NaN is missing.
- ``.csv`` (when ``task.window`` is not set; with it, windows are cut from a recording: ``load_windowed`` below), laid
  out as ``task.series_format`` says, by default long when the header has both ``id`` and ``time`` columns, else wide:

  - wide: one row per sample, the ``data.label_column`` and one column per channel and step named
    ``<channel>_<step>``, steps counted from 0 (``ax_0 … ax_99, ay_0 … ay_99``; any column order), or just
    ``0 … T-1`` for a single channel;
  - long: one row per sample and time step, columns ``id`` (the sample), ``time`` (numbers, or text that sorts in time
    order such as ISO 8601), the ``data.label_column`` (one label per id) and one column per channel (all the others).

  An empty cell or ``?`` is a missing value.

Missing values are filled per sample and channel by linear interpolation over time between the observed values on
either side; before the first or after the last observed value, that value is repeated. A channel with no observed
value at all is an error naming the file, line (or sample, or id) and channel. The summary counts the filled values
(``imputed_values``). In ``.npz`` and wide CSV, which are rectangular, a shorter series may end in missing values:
filling repeats its last value, as padding would (they count as imputed).

Lengths: the bundle's model takes a fixed [channels, steps], so every series is brought to one length T,
``task.series_length`` when set, else the longest training series: a shorter series is padded at its end with its
last value, a longer one keeps its first T steps. Series may differ in length only where the data says so (a .ts
file's ``@equalLength false``) or once ``task.series_length`` is set; otherwise differing lengths are an error (a long
CSV's ids, a test file of another length than train). The summary's ``lengths`` says what was done (T, where it came
from, the shortest and longest series read, how many were padded and truncated). The device is sent windows of T steps.

``sktime:BasicMotions/BasicMotions_TRAIN.ts`` names a file the sktime wheel ships. Without ``data.test_path`` a
stratified fifth of the data is held out for test. Validation is a stratified tenth of train
(``data.idx.val_share`` does not apply). Labels keep the order the file declares.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from edgekit.config import PACKAGED_DATA_PREFIX
from edgekit.data import DataError, TaskData, carve_stratified, checked_labels, task_data_from

CALIBRATION_ROWS = 256
VAL_SHARE = 0.1
TEST_SHARE = 0.2
MISSING_CELLS = ("", "?")  # in CSV cells; .ts marks a missing value '?'
LONG_COLUMNS = ("id", "time")
WIDE_COLUMN = re.compile(r"(?:(.+)_)?([0-9]+)")  # <channel>_<step>, or <step> alone for a single channel
SeriesFormat = Literal["wide", "long"]


@dataclass(frozen=True)
class RawSeries:
    """Series as one file holds them, before filling and fitting: per sample [channels, steps] float32, NaN where a
    value is missing (steps may differ between samples)."""

    path: Path
    samples: list[np.ndarray]
    labels: list[str]
    places: list[str]  # where each sample was read ("a.ts:9", "s.npz sample 3", "l.csv id 'b'"): for messages
    declared: list[str]  # the labels the file declares, in its order
    channel_names: list[str] | None = None  # CSV columns; .ts and .npz name none
    varying: bool = False  # the file declares series of differing lengths (.ts @equalLength false)

    def channel(self, index: int) -> str:
        return repr(self.channel_names[index]) if self.channel_names else f"{index} (counting from 0)"


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


def read_raw(path: Path, label_column: str = "label", series_format: SeriesFormat | None = None) -> RawSeries:
    """A .ts, .npz or .csv file's series as written (missing values NaN, lengths as they are), checked sample by sample."""
    path = resolve_packaged(path)
    if not path.is_file():
        raise DataError(f"time-series file {path} does not exist; set data.path (and data.test_path) to .ts, .npz or .csv files")
    if path.suffix == ".csv":
        raw = _read_csv(path, label_column, series_format)
    elif path.suffix in (".ts", ".npz"):
        raw = _read_ts(path) if path.suffix == ".ts" else _read_npz(path)
    else:
        raise DataError(f"{path}: time series are read from .ts (UCR/UEA archive), .npz (X [samples, channels, steps], y) "
                        "or .csv files (wide or long: see task.series_format)")
    if not raw.samples:
        raise DataError(f"{path}: no samples")
    return raw


def read_series(path: Path, label_column: str = "label", series_format: SeriesFormat | None = None,
                length: int | None = None) -> tuple[np.ndarray, list[str], list[str]]:
    """Samples [n, channels, steps] (float32), their labels, and the labels the file declares (in its order): missing
    values filled and series brought to ``length`` steps (default: the file's longest) as ``load_task_data`` does."""
    raw = read_raw(path, label_column, series_format)
    _check_lengths(raw, length)
    target = length or max(sample.shape[1] for sample in raw.samples)
    return _prepared(raw, np.arange(len(raw.samples)), target, True, Counter()), raw.labels, raw.declared


def _read_npz(path: Path) -> RawSeries:
    try:
        with np.load(path, allow_pickle=False) as arrays:
            x, y = arrays["X"], arrays["y"]
    except (KeyError, ValueError, OSError) as problem:
        raise DataError(f"{path}: expected arrays X [samples, channels, steps] and y ({problem})") from None
    if x.ndim == 2:
        x = x[:, None, :]
    if x.ndim != 3 or len(x) != len(y) or not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{path}: X must be numbers [samples, channels, steps] with one y per sample; got X {x.dtype} "
                        f"{list(x.shape)}, y {list(y.shape)}")
    x = x.astype(np.float32)
    infinite = np.flatnonzero(np.isinf(x).any(axis=(1, 2)))
    if len(infinite):
        raise DataError(f"{path}: sample {infinite[0]} of X (counting from 0) holds infinite values; missing values are NaN")
    labels = [str(v) for v in y.tolist()]
    return RawSeries(path, list(x), labels, [f"{path} sample {i}" for i in range(len(x))], sorted(set(labels)))


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


def _read_ts(path: Path) -> RawSeries:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as problem:
        raise DataError(f"{path} is not UTF-8 text ({problem.reason} at byte {problem.start})") from None
    header, data_line = _header(path, lines)
    declared = header.get("classlabel", "").split()
    if not declared or declared[0].lower() != "true":
        raise DataError(f"{path}: the header has no '@classLabel true <labels>'; classification needs labelled series")
    varying = header.get("equallength", "true").lower() != "true"
    samples, labels, places = [], [], []
    for number, raw in enumerate(lines[data_line:], start=data_line + 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        *channels, label = line.split(":")
        samples.append(_channels(path, number, channels, samples[0] if samples else None, varying))
        labels.append(label.strip())
        places.append(f"{path}:{number}")
    dimensions = header.get("dimensions")
    if samples and dimensions and int(dimensions) != samples[0].shape[0]:
        raise DataError(f"{path}: the header says @dimensions {dimensions} but the samples have {samples[0].shape[0]} channel(s)")
    return RawSeries(path, samples, labels, places, declared[1:], None, varying)


def _channels(path: Path, number: int, channels: list[str], first: np.ndarray | None, varying: bool) -> np.ndarray:
    if not channels:
        raise DataError(f"{path}:{number}: a sample needs its values, then ':' and its label")
    try:
        values = [np.asarray([_ts_value(v) for v in channel.split(",")], dtype=np.float32) for channel in channels]
    except ValueError as problem:
        raise DataError(f"{path}:{number}: a value is not a number ({problem}); a missing value is written '?'") from None
    lengths = sorted({len(v) for v in values})
    unlike_first = first is not None and (len(values) != first.shape[0] or (not varying and lengths[0] != first.shape[1]))
    if len(lengths) != 1 or unlike_first:
        shape = f"{len(values)} channel(s) of lengths {lengths}"
        if varying:
            expected = f"; the first sample has {first.shape[0]} channel(s)" if first is not None else ""
            rule = "every sample must have the same channels, and the channels of one sample one length"
        else:
            expected = f"; the first sample has {first.shape[0]} x {first.shape[1]}" if first is not None else ""
            rule = "every sample must have the same channels and length (series of differing lengths: @equalLength false)"
        raise DataError(f"{path}:{number}: {shape}{expected}: {rule}")
    stacked = np.stack(values)
    if np.isinf(stacked).any():
        raise DataError(f"{path}:{number}: infinite values; a missing value is written '?'")
    return stacked


def _ts_value(text: str) -> float:
    return math.nan if text.strip() == "?" else float(text)


# ---------------------------------------------------------------- CSV series (wide or long)


def _read_csv(path: Path, label_column: str, series_format: SeriesFormat | None) -> RawSeries:
    header, rows = _csv_table(path)
    if label_column not in header:
        raise DataError(f"{path}: no label column {label_column!r}; the columns are {header} (set data.label_column)")
    if series_format is None:
        series_format = "long" if set(LONG_COLUMNS) <= set(header) else "wide"
    return (_read_long if series_format == "long" else _read_wide)(path, header, rows, label_column)


def _csv_table(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header (cells stripped) and the data rows with their line numbers; each row as wide as the header."""
    import csv

    try:
        with path.open(newline="", encoding="utf-8") as handle:
            table = list(csv.reader(handle))
    except UnicodeDecodeError as problem:
        raise DataError(f"{path} is not UTF-8 text ({problem.reason} at byte {problem.start})") from None
    if not table or not table[0]:
        raise DataError(f"{path}: empty; a CSV of series starts with a header line")
    header = [cell.strip() for cell in table[0]]
    duplicates = sorted({name for name in header if header.count(name) > 1})
    if duplicates:
        raise DataError(f"{path}: column(s) {duplicates} appear more than once in the header")
    rows = []
    for number, row in enumerate(table[1:], start=2):
        if not row:
            continue
        if len(row) != len(header):
            raise DataError(f"{path}:{number}: {len(row)} cells but the header has {len(header)}")
        rows.append((number, row))
    return header, rows


def _cell(path: Path, number: int, column: str, text: str) -> float:
    text = text.strip()
    if text in MISSING_CELLS:
        return math.nan
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"{path}:{number}: column {column!r} holds {text!r}, not a number; a missing value is an empty "
                        "cell or '?'") from None
    if math.isinf(value):
        raise DataError(f"{path}:{number}: column {column!r} holds {text!r}, an infinite value")
    return value


def _read_wide(path: Path, header: list[str], rows: list[tuple[int, list[str]]], label_column: str) -> RawSeries:
    layout = _wide_layout(path, [name for name in header if name != label_column], label_column)
    at = {name: index for index, name in enumerate(header)}
    samples, labels, places = [], [], []
    for number, row in rows:
        samples.append(np.asarray([[_cell(path, number, name, row[at[name]]) for name in columns]
                                   for columns in layout.values()], np.float32))
        labels.append(row[at[label_column]].strip())
        places.append(f"{path}:{number}")
    names = None if list(layout) == [""] else list(layout)
    return RawSeries(path, samples, labels, places, [], names)


def _wide_layout(path: Path, columns: list[str], label_column: str) -> dict[str, list[str]]:
    """Channel name ("" for a single unnamed channel) → its value columns in step order, checked complete."""
    steps: dict[str, dict[int, str]] = {}
    strangers = []
    for name in columns:
        match = WIDE_COLUMN.fullmatch(name)
        if match is None:
            strangers.append(name)
            continue
        channel, step = match.group(1) or "", int(match.group(2))
        if step in steps.get(channel, {}):
            raise DataError(f"{path}: columns {steps[channel][step]!r} and {name!r} are both step {step} of one series")
        steps.setdefault(channel, {})[step] = name
    if not steps and not strangers:
        raise DataError(f"{path}: no series columns besides the label {label_column!r}")
    if strangers or ("" in steps and len(steps) > 1):
        odd = strangers or list(steps[""].values())
        raise DataError(f"{path}: column(s) {odd[:8]} are neither the label ({label_column!r}, data.label_column) nor "
                        "series values: a wide CSV names its value columns <channel>_<step> (ax_0 … ax_99, ay_0 …), or "
                        "0 … T-1 for a single channel; a long CSV (one row per time step) has columns id and time "
                        "(task.series_format: long)")
    length = max(max(found) for found in steps.values()) + 1
    for channel, found in steps.items():
        prefix = f"{channel}_" if channel else ""
        lacking = [f"{prefix}{step}" for step in range(length) if step not in found]
        if lacking:
            who = f"channel {channel!r}" if channel else "the series"
            raise DataError(f"{path}: {who} lacks column(s) {lacking[:5]}; a wide CSV has one column per channel and step, "
                            f"{prefix}0 … {prefix}{length - 1} (a missing value is an empty cell)")
    return {channel: [found[step] for step in range(length)] for channel, found in steps.items()}


def _read_long(path: Path, header: list[str], rows: list[tuple[int, list[str]]], label_column: str) -> RawSeries:
    lacking = [name for name in (*LONG_COLUMNS, label_column) if name not in header]
    if lacking:
        raise DataError(f"{path}: a long CSV needs columns id, time and {label_column!r} (data.label_column); it lacks "
                        f"{lacking}; the columns are {header}")
    channels = [name for name in header if name not in (*LONG_COLUMNS, label_column)]
    if not channels:
        raise DataError(f"{path}: no channel columns besides id, time and {label_column!r}; every other column is a channel")
    at = {name: index for index, name in enumerate(header)}
    groups: dict[str, list[tuple[int, list[str]]]] = {}
    for number, row in rows:
        if not row[at["id"]].strip() or not row[at["time"]].strip():
            raise DataError(f"{path}:{number}: every row needs an id and a time")
        groups.setdefault(row[at["id"]].strip(), []).append((number, row))
    samples, labels, places = [], [], []
    for name, members in groups.items():
        names = sorted({row[at[label_column]].strip() for _, row in members})
        if len(names) != 1:
            raise DataError(f"{path}: id {name!r} has labels {names}; the rows of one id are one series with one label")
        samples.append(_long_sample(path, name, members, at, channels))
        labels.append(names[0])
        places.append(f"{path} id {name!r}")
    return RawSeries(path, samples, labels, places, [], channels)


def _long_sample(path: Path, name: str, members: list[tuple[int, list[str]]], at: dict[str, int], channels: list[str]) -> np.ndarray:
    """One id's rows in time order → [channels, steps]; a time given twice is an error naming both lines."""
    times = [row[at["time"]].strip() for _, row in members]
    numeric = all(_is_number(time) and math.isfinite(float(time)) for time in times)
    keys = [float(time) if numeric else time for time in times]
    order = sorted(range(len(members)), key=keys.__getitem__)
    for before, after in zip(order, order[1:]):
        if keys[before] == keys[after]:
            raise DataError(f"{path}:{members[after][0]}: id {name!r} has time {times[after]!r} twice (also on line "
                            f"{members[before][0]}); one row per id and time")
    return np.asarray([[_cell(path, members[i][0], channel, members[i][1][at[channel]]) for i in order]
                       for channel in channels], np.float32)


# ---------------------------------------------------------------- filling, lengths, splits


def _check_lengths(raw: RawSeries, series_length: int | None) -> None:
    """Series of one file may differ in length only where it says so (@equalLength false) or task.series_length is set."""
    if raw.varying or series_length is not None:
        return
    first = raw.samples[0].shape[1]
    other = next((i for i, sample in enumerate(raw.samples) if sample.shape[1] != first), None)
    if other is not None:
        first_place = raw.places[0].removeprefix(f"{raw.path} ")  # "id 'a'" after the path the message starts with
        raise DataError(f"{raw.places[other]} has {raw.samples[other].shape[1]} time steps but {first_place} has "
                        f"{first}; series of one file have one length unless task.series_length is set (each series is "
                        "then padded at its end with its last value, or truncated)")


def _check_channels(train: RawSeries, test: RawSeries) -> None:
    named = train.channel_names is not None and test.channel_names is not None
    if test.samples[0].shape[0] != train.samples[0].shape[0] or (named and test.channel_names != train.channel_names):
        described = [(raw.path, raw.channel_names or f"{raw.samples[0].shape[0]} channel(s)") for raw in (test, train)]
        raise DataError(f"{described[0][0]} holds series of {described[0][1]} but {described[1][0]} of {described[1][1]}; "
                        "they must match")


def _filled(raw: RawSeries, index: int) -> tuple[np.ndarray, int]:
    """Sample ``index`` with its missing values interpolated over time (beyond the ends: the nearest observed value)."""
    sample = raw.samples[index]
    missing = np.isnan(sample)
    if not missing.any():
        return sample, 0
    steps = np.arange(sample.shape[1])
    filled = sample.copy()
    for channel, values in enumerate(sample):
        observed = ~missing[channel]
        if not observed.any():
            raise DataError(f"{raw.places[index]}: channel {raw.channel(channel)} has no observed value (all "
                            f"{len(values)} missing), so nothing to fill it from; drop the sample or give the channel a value")
        filled[channel] = np.interp(steps, steps[observed], values[observed])
    return filled, int(missing.sum())


def _prepared(raw: RawSeries, indices: np.ndarray, target: int, may_fit: bool, counts: Counter) -> np.ndarray:
    """The samples at ``indices``, filled and brought to ``target`` steps (padded with their last value or truncated)."""
    out = np.empty((len(indices), raw.samples[0].shape[0], target), np.float32)
    for row, index in enumerate(indices):
        sample, imputed = _filled(raw, index)
        counts["imputed"] += imputed
        steps = sample.shape[1]
        if steps != target and not may_fit:
            raise DataError(f"{raw.places[index]} has {steps} time steps but the training series have {target}; "
                            "they must match, or set task.series_length to pad (with each series' last value) or "
                            "truncate them all to one length")
        counts["padded" if steps < target else "truncated" if steps > target else "kept"] += 1
        out[row, :, :min(steps, target)] = sample[:, :target]
        out[row, :, steps:] = sample[:, -1:]
        counts["shortest"] = min(counts.get("shortest", steps), steps)
        counts["longest"] = max(counts["longest"], steps)
    return out


def load_task_data(path: Path, test_path: Path | None, seed: int = 0, *, label_column: str = "label",
                   series_length: int | None = None, series_format: SeriesFormat | None = None) -> TaskData:
    """Read, check and split the build's labelled series (train/val from ``path``, test from ``test_path`` or held out),
    missing values filled and every series brought to ``series_length`` steps (default: the longest training series)."""
    raw = read_raw(path, label_column, series_format)
    _check_lengths(raw, series_length)
    names = np.asarray(raw.labels)
    if test_path is not None:
        test_raw = read_raw(test_path, label_column, series_format)
        _check_lengths(test_raw, series_length)
        _check_channels(raw, test_raw)
        pool, test = np.arange(len(names)), (test_raw, np.arange(len(test_raw.labels)))
    else:
        held_out = carve_stratified(names, TEST_SHARE, seed)
        pool, test = np.flatnonzero(~held_out), (raw, np.flatnonzero(held_out))
    order = [label for label in raw.declared if label in set(raw.labels)] or sorted(set(raw.labels))
    val = carve_stratified(np.asarray([order.index(n) for n in names[pool]]), VAL_SHARE, seed)  # classes drawn in label order
    picks = {"train": (raw, pool[~val]), "val": (raw, pool[val]), "test": test}
    target = series_length or max((raw.samples[i].shape[1] for i in picks["train"][1]), default=1)
    counts: Counter = Counter()
    parts = {name: (_prepared(source, indices, target, series_length is not None or source.varying, counts),
                    [source.labels[i] for i in indices]) for name, (source, indices) in picks.items()}
    summary = {"source": str(path), "dropped": {}, "warnings": [], "imputed_values": counts["imputed"]}
    if series_length is not None or raw.varying or test[0].varying:
        summary["lengths"] = {"steps": target, "from": "task.series_length" if series_length else "the longest training series",
                              **{key: counts[key] for key in ("shortest", "longest", "padded", "truncated")}}
    if raw.channel_names:
        summary["channel_names"] = raw.channel_names
    return _task_data(parts, raw.declared, str(test_path or path), summary)


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
