"""Labelled texts for the text task: read them, clean them, split them.

Three steps, each a plain function a reader can follow:

1. ``read_rows`` reads CSV / TSV, JSONL, Parquet or a Hugging Face ``save_to_disk``
   folder into raw ``Row`` records, cells as found. A row that cannot be read
   (a line that is not JSON) becomes a ``Row`` with ``error`` set: it is counted,
   never fatal. A file that cannot be read at all (wrong delimiter, not UTF-8,
   missing column) is a ``DataError`` that says how to fix it.
2. ``clean_rows`` drops empty texts, missing labels, exact duplicates and texts
   seen with two labels, and says how many rows went for each reason.
3. ``load_dataset`` runs both and splits: by the split column when the data has
   one, else a seeded, hash-based stratified 70/10/20 split that gives the same
   answer on every machine and for any row order.

``to_task_data`` turns a ``Dataset`` into the ``TaskData`` the build's passes use.
pyarrow (Parquet, Hugging Face folders) is imported only when such a file is read.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path


from edgekit.data import (
    MIN_CALIBRATION_ROWS,
    MIN_ROWS_TO_SPLIT,
    SPLIT_ALIASES,
    SPLITS,
    DataError,
    Example,
    Split,
    TaskData,
    assign_splits,
    class_balance,
    stratified_order,
)

CSV_SUFFIXES = {".csv": ",", ".tsv": "\t"}
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
_INTEGRAL_FLOAT = re.compile(r"^-?\d+\.0+$")


@dataclass(frozen=True)
class Row:
    """One record as read: cells are whatever the file held (str, number, None, ...)."""

    text: object
    label: object
    split: object = None  # None when the data has no split column
    error: str | None = None  # why the record could not be read; such rows are dropped and counted


@dataclass(frozen=True)
class CleaningReport:
    """How many rows were read, kept, and dropped for each reason (rows_read = rows_kept + dropped)."""

    rows_read: int
    rows_kept: int
    unreadable: int = 0  # the record could not be parsed (e.g. a line that is not a JSON object)
    missing_text: int = 0  # text empty, whitespace, missing, NaN or not a string/number
    missing_label: int = 0  # label empty, missing or NaN
    missing_split: int = 0  # the data has a split column but this row has no value in it
    duplicates: int = 0  # same text and label as an earlier row (the first is kept)
    conflicting_labels: int = 0  # every row of a text that appears with two or more labels

    def dropped(self) -> dict[str, int]:
        """The reasons that dropped rows, with their counts."""
        reasons = ("unreadable", "missing_text", "missing_label", "missing_split", "duplicates", "conflicting_labels")
        return {reason: getattr(self, reason) for reason in reasons if getattr(self, reason)}

    def summary(self) -> str:
        dropped = ", ".join(f"{count} {reason.replace('_', ' ')}" for reason, count in self.dropped().items())
        return f"{self.rows_kept} of {self.rows_read} rows kept" + (f"; dropped: {dropped}" if dropped else "")


@dataclass(frozen=True)
class Dataset:
    """A cleaned, split dataset; labels are the sorted classes of train."""

    source: str
    labels: tuple[str, ...]
    train: tuple[Example, ...]
    val: tuple[Example, ...]
    test: tuple[Example, ...]
    cleaning: CleaningReport
    balance: dict[str, dict[str, int]]  # split name -> label -> rows
    warnings: tuple[str, ...] = ()  # e.g. a class too small to appear in val/test

    def split(self, name: str) -> tuple[Example, ...]:
        return {"train": self.train, "val": self.val, "test": self.test}[name]


def read_rows(path: Path | str, text_column: str = "text", label_column: str = "label", split_column: str = "split") -> list[Row]:
    """Read every record of ``path`` as a raw ``Row``; the format follows from the suffix (a folder: Hugging Face).

    Raises ``DataError`` when the file cannot be used at all: absent, unknown format,
    wrong delimiter, not UTF-8, no rows, or no text / label column.
    """
    path = Path(path)
    if path.is_dir():
        table, columns = _read_hf_folder(path, text_column, label_column, split_column)
    elif not path.is_file():
        raise DataError(f"data file {path} does not exist; set data.path in the build config")
    elif path.suffix.lower() in CSV_SUFFIXES:
        table, columns = _read_csv(path, CSV_SUFFIXES[path.suffix.lower()])
    elif path.suffix.lower() in JSONL_SUFFIXES:
        table, columns = _read_jsonl(path)
    elif path.suffix.lower() in PARQUET_SUFFIXES:
        table, columns = _read_parquet(path, (text_column, label_column, split_column))
    else:
        known = ", ".join((*CSV_SUFFIXES, *JSONL_SUFFIXES, *PARQUET_SUFFIXES))
        raise DataError(f"{path}: unknown data format {path.suffix!r}; known: {known}, or a folder saved by datasets' save_to_disk")
    if not table:
        raise DataError(f"data file {path} holds no rows")
    if all(isinstance(record, Row) and record.error for record in table):
        raise DataError(f"no record of {path} could be read; the first problem: {table[0].error}")
    missing = [name for name in (text_column, label_column) if name not in columns]
    if missing:
        raise DataError(
            f"{path} has no column {' or '.join(map(repr, missing))} (columns found: {sorted(columns)}); "
            "name the columns with data.text_column / data.label_column in the build config"
        )
    return [
        record if isinstance(record, Row) else Row(record.get(text_column), record.get(label_column), record.get(split_column))
        for record in table
    ]


def _decode_error(path: Path, exc: UnicodeDecodeError) -> DataError:
    return DataError(
        f"{path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
        f"re-save it as UTF-8, e.g. iconv -f latin1 -t utf-8 {path.name} > utf8-{path.name}"
    )


def _read_csv(path: Path, delimiter: str) -> tuple[list[dict], set[str]]:
    try:
        # utf-8-sig: spreadsheet exports often start with a byte-order mark that would glue itself to the first column name
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle, delimiter=delimiter)
            header = reader.fieldnames or []
            if len(header) == 1:
                for other in (";", "\t", "|", ","):
                    if other != delimiter and other in header[0]:
                        raise DataError(_delimiter_message(path, other, delimiter))
            table = list(reader)
    except UnicodeDecodeError as exc:
        raise _decode_error(path, exc) from None
    except csv.Error as exc:
        raise DataError(f"{path} is not valid CSV ({exc}); check its quoting") from None
    return table, set(header)


def _delimiter_message(path: Path, found: str, expected: str) -> str:
    names = {",": "comma", ";": "';'", "\t": "tab", "|": "'|'"}
    if found == "\t":
        fix = f"rename it to {path.stem}.tsv"
    elif found == ",":
        fix = f"rename it to {path.stem}.csv"
    else:
        fix = "re-save it comma-separated (or as JSONL)"
    return f"{path} looks {names[found]}-separated, not {names[expected]}-separated (its header is one column); {fix}"


def _read_jsonl(path: Path) -> tuple[list[dict | Row], set[str]]:
    table: list[dict | Row] = []
    columns: set[str] = set()
    try:
        with path.open(encoding="utf-8-sig") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    table.append(Row(None, None, error=f"{path}:{number} is not JSON ({exc.msg})"))
                    continue
                if not isinstance(record, dict):
                    table.append(Row(None, None, error=f"{path}:{number} is not a JSON object"))
                    continue
                columns.update(record)
                table.append(record)
    except UnicodeDecodeError as exc:
        raise _decode_error(path, exc) from None
    return table, columns


def _import_pyarrow(path: Path):
    # Heavy: imported only when a Parquet file or Hugging Face folder is read.
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow; pip install pyarrow (or pip install 'edgekit[build]')") from None
    return pyarrow


def _read_parquet(path: Path, wanted: tuple[str, ...]) -> tuple[list[dict], set[str]]:
    pa = _import_pyarrow(path)
    try:
        columns = set(pa.parquet.read_schema(path).names)
        table = pa.parquet.read_table(path, columns=[name for name in wanted if name in columns])
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path} is not a readable Parquet file ({exc})") from None
    return table.to_pylist(), columns


def _read_hf_folder(path: Path, text_column: str, label_column: str, split_column: str) -> tuple[list[dict], set[str]]:
    """A folder written by ``datasets``' ``save_to_disk``: a Dataset, or a DatasetDict whose split names become the split.

    Read with pyarrow alone (the folder is Arrow IPC streams plus JSON), so the
    ``datasets`` package is not needed. ClassLabel integers become their names.
    """
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
        table: list[dict] = []
        columns: set[str] = set()
        for name in splits:
            part, part_columns = _read_hf_dataset(path / name, label_column)
            if split_column not in part_columns:
                for record in part:
                    record[split_column] = name
            table += part
            columns |= part_columns | {split_column}
        return table, columns
    if (path / "state.json").is_file():
        return _read_hf_dataset(path, label_column)
    raise DataError(
        f"{path} is a folder without dataset_dict.json or state.json; a folder must be saved by datasets' save_to_disk, "
        "else point data.path at a .csv, .jsonl or .parquet file"
    )


def _read_hf_dataset(folder: Path, label_column: str) -> tuple[list[dict], set[str]]:
    pa = _import_pyarrow(folder)
    state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    tables = []
    for data_file in state["_data_files"]:
        with pa.memory_map(str(folder / data_file["filename"])) as source:
            tables.append(pa.ipc.open_stream(source).read_all())
    table = pa.concat_tables(tables) if tables else pa.table({})
    records = table.to_pylist()
    info_path = folder / "dataset_info.json"
    features = json.loads(info_path.read_text(encoding="utf-8")).get("features", {}) if info_path.is_file() else {}
    names = (features.get(label_column) or {}).get("names") if isinstance(features, dict) else None
    if names:
        for record in records:
            value = record.get(label_column)
            if isinstance(value, int) and 0 <= value < len(names):
                record[label_column] = names[value]
    return records, set(table.column_names)


def text_cell(value: object) -> str | None:
    """A text cell as the build reads it; None when it holds no text."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (int, float)):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        return None
    return value


def label_cell(value: object) -> str | None:
    """Strip; 1, 1.0 and "1.0" all become "1"; None, NaN and "" become None."""
    if value is None or isinstance(value, bool):
        return None if value is None else str(value).lower()
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return str(int(value)) if value.is_integer() else str(value)
    if isinstance(value, int):
        return str(value)
    if not isinstance(value, str):
        return None
    value = value.strip()
    if _INTEGRAL_FLOAT.match(value):
        value = value.split(".")[0]
    return value or None


def _split_name(value: object) -> str | None:
    return value.strip().lower() if isinstance(value, str) and value.strip() else None


def clean_rows(rows: list[Row], source: str = "data") -> tuple[list[Example], CleaningReport]:
    """Keep the rows a model can learn from, in their order; count every dropped row under one reason.

    Examples have split "" when the data has no split column. Raises ``DataError``
    only for split values that are not train / val / test (a whole-file problem).
    """
    uses_split = any(_split_name(row.split) is not None for row in rows if row.error is None)
    unknown = sorted({str(row.split).strip() for row in rows if row.error is None and _split_name(row.split) not in (None, *SPLIT_ALIASES)})
    if uses_split and unknown:
        raise DataError(f"{source}: split values {unknown} are not train / val / test (or validation / dev); fix them or drop the split column")
    counts: Counter[str] = Counter()
    parsed: list[Example] = []
    for row in rows:
        if row.error is not None:
            counts["unreadable"] += 1
            continue
        text, label, split = text_cell(row.text), label_cell(row.label), _split_name(row.split)
        if text is None:
            counts["missing_text"] += 1
        elif label is None:
            counts["missing_label"] += 1
        elif uses_split and split is None:
            counts["missing_split"] += 1
        else:
            parsed.append(Example(text, label, SPLIT_ALIASES[split] if uses_split else ""))
    labels_of: dict[str, set[str]] = {}
    for example in parsed:
        labels_of.setdefault(example.text, set()).add(example.label)
    kept: list[Example] = []
    seen: set[str] = set()
    for example in parsed:
        if len(labels_of[example.text]) > 1:
            counts["conflicting_labels"] += 1
        elif example.text in seen:  # same text, hence same label: a duplicate, also across splits (no train/test leak)
            counts["duplicates"] += 1
        else:
            seen.add(example.text)
            kept.append(example)
    return kept, CleaningReport(rows_read=len(rows), rows_kept=len(kept), **counts)


def load_dataset(
    path: Path | str,
    text_column: str = "text",
    label_column: str = "label",
    split_column: str = "split",
    seed: int = 0,
) -> Dataset:
    """Read, clean and split ``path``; see the module docstring.

    Raises ``DataError`` when nothing usable remains, when train has fewer than two
    classes, when val or test holds a label train lacks, or when val or test is empty.
    """
    source = str(path)
    examples, report = clean_rows(read_rows(path, text_column, label_column, split_column), source)
    if not examples:
        raise DataError(f"{source}: no usable rows ({report.summary()})")
    warnings: list[str] = []
    if not examples[0].split:
        examples, warnings = assign_splits(examples, seed)
    splits = {name: tuple(example for example in examples if example.split == name) for name in SPLITS}
    labels = tuple(sorted({example.label for example in splits["train"]}))
    if len(labels) < 2:
        raise DataError(f"{source}: train has {len(labels)} class(es) {list(labels)} after cleaning; classification needs at least 2 ({report.summary()})")
    for name in ("val", "test"):
        strangers = sorted({example.label for example in splits[name]} - set(labels))
        if strangers:
            raise DataError(f"{source}: {name} has label(s) {strangers} that train does not; the model cannot learn them: move some of their rows to train")
        if not splits[name]:
            raise DataError(f"{source}: the {name} split is empty; add rows (each class needs {MIN_ROWS_TO_SPLIT} to be split) or give it rows in the split column")
    return Dataset(
        source=source,
        labels=labels,
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        cleaning=report,
        balance={name: class_balance(splits[name]) for name in SPLITS},
        warnings=tuple(warnings),
    )


def to_task_data(dataset: Dataset, calibration_rows: list[Row] | None = None) -> TaskData:
    """The build's ``TaskData``: splits in stratified interleaved order; calibration from its rows or the head of train.

    Calibration rows need only a text; a label train lacks counts as class 0 (labels
    only order calibration rows). The digest hashes the content, not the files, so a
    re-saved or re-formatted file with the same rows keeps the build's caches.
    """
    index = {label: position for position, label in enumerate(dataset.labels)}
    splits = {
        name: Split(*stratified_order([e.text for e in dataset.split(name)], [index[e.label] for e in dataset.split(name)]))
        for name in SPLITS
    }
    if calibration_rows is not None:
        pairs = [(text, label_cell(row.label)) for row in calibration_rows if row.error is None and (text := text_cell(row.text)) is not None]
        calibration = Split(*stratified_order([text for text, _ in pairs], [index.get(label, 0) for _, label in pairs]))
    else:
        calibration = splits["train"].head(256)
    if len(calibration) < MIN_CALIBRATION_ROWS:
        raise DataError(f"calibration set has {len(calibration)} rows; quantization needs at least {MIN_CALIBRATION_ROWS}")
    digest = hashlib.sha256()
    digest.update(json.dumps(dataset.labels).encode())
    for name, split in (*splits.items(), ("calibration", calibration)):
        digest.update(json.dumps([name, list(split.texts), split.labels.tolist()]).encode())
    summary = {"source": dataset.source, "rows_read": dataset.cleaning.rows_read, "rows_kept": dataset.cleaning.rows_kept,
               "dropped": dataset.cleaning.dropped(), "balance": dataset.balance, "warnings": list(dataset.warnings)}
    return TaskData(dataset.labels, splits["train"], splits["val"], splits["test"], calibration, digest.hexdigest(), summary)
