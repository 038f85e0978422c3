"""Labelled tables: CSV or Parquet rows with a label column, read with pyarrow, split, and described for the bundle.

Each row becomes a dict of column → value (numbers as float or int, text as
str, missing cells as None): the raw row a device receives as JSON. Column
kinds are inferred from the training rows: a column that holds only numbers
(and missing cells) is numeric, any other is categorical; ``task.table.categorical``
makes a column of codes categorical. Categories and the fill of each numeric
column (its median) come from the training split only, so nothing of val or
test leaks into the model. A categorical column with more than
``task.table.max_categories`` distinct training values is an error naming it:
an id or a free-text column does not belong in the model (``task.table.ignore``).
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.bundle import MAX_TABLE_COLUMNS, TableColumn, TablePreprocessing
from device_agent.preprocess import category_key
from edgekit.config import TableSection
from edgekit.data import DataError, TaskData, carve_stratified, checked_labels, task_data_from

CALIBRATION_ROWS = 256
VAL_SHARE = 0.1
TEST_SHARE = 0.2
CSV_SUFFIXES = (".csv", ".tsv", ".txt")
# CSV cells read as missing: pyarrow's defaults and "?", which the UCI and UCR/UEA archives use.
MISSING_CELLS = ("", "?", "NA", "N/A", "NaN", "nan", "null", "NULL", "None", "#N/A")
PARQUET_SUFFIXES = (".parquet", ".pq")


def read_rows(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """The table at ``path``: its column names (in file order) and its rows as dicts."""
    if not path.is_file():
        raise DataError(f"table {path} does not exist; set data.path to a CSV or Parquet file with a header row")
    try:
        if path.suffix.lower() in PARQUET_SUFFIXES:
            import pyarrow.parquet as parquet

            table = parquet.read_table(path)
        elif path.suffix.lower() in CSV_SUFFIXES:
            import pyarrow.csv as csv

            delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
            table = csv.read_csv(path, parse_options=csv.ParseOptions(delimiter=delimiter),
                                 convert_options=csv.ConvertOptions(null_values=list(MISSING_CELLS), strings_can_be_null=True))
        else:
            raise DataError(f"table {path}: unknown format {path.suffix!r}; use .csv, .tsv or .parquet")
    except DataError:
        raise
    except Exception as error:  # pyarrow raises ArrowInvalid and OSError subclasses naming the row that broke
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"table {path} cannot be read: {first}; check the header and that every row has as many "
                        "fields as it") from None
    if table.num_rows == 0:
        raise DataError(f"table {path} has a header but no rows")
    names = list(table.column_names)
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated or any(not name.strip() or len(name) > 256 for name in names):
        problem = (f"repeats column name(s) {repeated}" if repeated else
                   "has a column without a name or with a name over 256 characters")
        raise DataError(f"table {path} {problem}; give every column a distinct name of 1 to 256 characters in the header")
    return names, table.to_pylist()


def _label_names(rows: list[dict[str, Any]], label_column: str, path: Path) -> tuple[list[dict[str, Any]], list[str], int]:
    """The rows with a label, their labels as names, and how many rows had none."""
    kept, names = [], []
    for row in rows:
        label = category_key(row.pop(label_column))
        if label is None:
            continue
        kept.append(row)
        names.append(label)
    if not kept:
        raise DataError(f"table {path}: every row's {label_column!r} is empty; fill in the labels")
    return kept, names, len(rows) - len(kept)


def feature_columns(columns: list[str], label_column: str, table: TableSection, path: Path, *,
                    label_required: bool = True) -> list[str]:
    """The columns the model reads: all but the label and the ignored ones; a DataError for names that do not fit."""
    if label_required and label_column not in columns:
        raise DataError(f"table {path} has no label column {label_column!r}; its columns: {', '.join(columns[:30])}"
                        f"{' …' if len(columns) > 30 else ''}; set data.label_column")
    named = set(table.ignore) | set(table.categorical)
    unknown = sorted(named - set(columns))
    if unknown:
        raise DataError(f"task.table names column(s) {unknown} that {path} does not have; its columns: {', '.join(columns[:30])}")
    kept = [column for column in columns if column != label_column and column not in table.ignore]
    if not kept:
        raise DataError(f"table {path} has no column left to learn from besides {label_column!r}")
    if len(kept) > MAX_TABLE_COLUMNS:
        raise DataError(f"table {path} has {len(kept)} feature columns; at most {MAX_TABLE_COLUMNS} are supported: "
                        "list the others in task.table.ignore")
    return kept


def _read_split_source(path: Path, label_column: str, table: TableSection, expected: list[str] | None = None):
    columns, rows = read_rows(path)
    features = feature_columns(columns, label_column, table, path)
    if expected is not None and features != expected:
        missing = [c for c in expected if c not in features]
        raise DataError(f"test table {path} does not have the training table's columns: "
                        f"{'missing ' + ', '.join(missing) if missing else 'they are in another order or there are more'}; "
                        "both files need the same header")
    rows = [{column: row[column] for column in features} | {label_column: row[label_column]} for row in rows]
    rows, names, unlabelled = _label_names(rows, label_column, path)
    return features, rows, names, unlabelled


def load_task_data(path: Path, test_path: Path | None, label_column: str, table: TableSection, seed: int = 0) -> TaskData:
    """Read, check and split a labelled table (train/val from ``path``, test from ``test_path`` or held out)."""
    columns, rows, names, unlabelled = _read_split_source(path, label_column, table)
    if test_path is not None:
        _, test_rows, test_names, test_unlabelled = _read_split_source(test_path, label_column, table, columns)
        unlabelled += test_unlabelled
        held_out = np.zeros(len(rows), dtype=bool)
    else:
        held_out = carve_stratified(np.asarray(names), TEST_SHARE, seed) if len(set(names)) > 1 else np.zeros(len(rows), bool)
        test_rows = [row for row, h in zip(rows, held_out, strict=True) if h]
        test_names = [name for name, h in zip(names, held_out, strict=True) if h]
    rest = [(row, name) for row, name, h in zip(rows, names, held_out, strict=True) if not h]
    val = carve_stratified(np.asarray([name for _, name in rest]), VAL_SHARE, seed)
    parts = {
        "train": (row_array([r for (r, _), v in zip(rest, val, strict=True) if not v]), [n for (_, n), v in zip(rest, val, strict=True) if not v]),
        "val": (row_array([r for (r, _), v in zip(rest, val, strict=True) if v]), [n for (_, n), v in zip(rest, val, strict=True) if v]),
        "test": (row_array(test_rows), test_names),
    }
    labels = checked_labels(parts, [], str(test_path or path), "rows", "add rows (each class needs several)")
    spec = table_spec(list(parts["train"][0]), columns, table, label_column)  # refuses what cannot be encoded, before training
    kept = sum(len(n) for _, n in parts.values())
    summary = {"source": str(path), "rows_read": kept + unlabelled, "rows_kept": kept,
               "dropped": {"no label": unlabelled} if unlabelled else {},
               "warnings": [], "columns": {column.name: column.kind for column in spec.columns}}
    return task_data_from(labels, parts, CALIBRATION_ROWS, repr((labels, columns, table.model_dump())).encode(), summary)


def row_array(rows: list[dict[str, Any]]) -> np.ndarray:
    """Rows as an object array (what a Split of table rows holds)."""
    array = np.empty(len(rows), dtype=object)
    array[:] = rows
    return array


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def table_spec(rows: list[dict[str, Any]], columns: list[str], table: TableSection, label_column: str | None = None) -> TablePreprocessing:
    """How each column becomes features, from the training rows: numeric (fill: the median) or categorical (categories
    by frequency, then name); a DataError names a categorical column with more than ``max_categories`` values. The
    ignored columns and the label are recorded, so a device may receive whole rows of the table."""
    described = []
    for column in columns:
        values = [row.get(column) for row in rows]
        present = [value for value in values if category_key(value) is not None]
        if column not in table.categorical and all(_is_number(value) for value in present):
            numbers = [float(value) for value in present if math.isfinite(float(value))]
            described.append(TableColumn(name=column, kind="numeric", fill=float(np.median(numbers)) if numbers else 0.0))
            continue
        counts = Counter(category_key(value) for value in present)
        if len(counts) > table.max_categories:
            raise DataError(f"column {column!r} has {len(counts)} distinct values in train, more than "
                            f"task.table.max_categories ({table.max_categories}): an id or free text does not generalise; "
                            f"list it in task.table.ignore, or raise max_categories (at most 1000) if its values are "
                            "categories")
        names = [name for name, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))]
        described.append(TableColumn(name=column, kind="categorical", categories=[name[:256] for name in names] or ["(none)"]))
    ignored = list(dict.fromkeys([*table.ignore, *([label_column] if label_column else [])]))
    return TablePreprocessing(columns=described, ignored=[name for name in ignored if name not in columns])
