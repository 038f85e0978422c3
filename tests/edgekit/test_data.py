"""edgekit.data: each format read back, each cleaning reason counted, the split deterministic, each error clear."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest

from edgekit.tasks.text_data import (
    CleaningReport,
    DataError,
    Row,
    class_balance,
    clean_rows,
    load_dataset,
    read_rows,
    to_task_data,
)

HAS_PYARROW = importlib.util.find_spec("pyarrow") is not None
HAS_DATASETS = importlib.util.find_spec("datasets") is not None


def make_records(classes: int = 3, per_class: int = 30, split: bool = False) -> list[dict]:
    records = []
    for c in range(classes):
        for i in range(per_class):
            record = {"text": f"example {i} of class {c}", "label": f"class{c}"}
            if split:
                record["split"] = (["train"] * 7 + ["val"] + ["test"] * 2)[i % 10]
            records.append(record)
    return records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def write_csv(path: Path, records: list[dict], delimiter: str = ",") -> Path:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(records)
    return path


def as_pairs(rows: list[Row]) -> list[tuple]:
    return [(row.text, row.label, row.split) for row in rows]


# ---------------------------------------------------------------- formats


def test_csv_and_jsonl_read_the_same_rows(tmp_path):
    records = make_records(split=True)
    from_csv = read_rows(write_csv(tmp_path / "d.csv", records))
    from_jsonl = read_rows(write_jsonl(tmp_path / "d.jsonl", records))
    from_tsv = read_rows(write_csv(tmp_path / "d.tsv", records, delimiter="\t"))
    assert as_pairs(from_csv) == as_pairs(from_jsonl) == as_pairs(from_tsv)
    assert as_pairs(from_csv)[0] == ("example 0 of class 0", "class0", "train")


def test_csv_with_byte_order_mark_and_other_column_names(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes("\ufeffsentence,y\nhello there,pos\n".encode())
    assert as_pairs(read_rows(path, text_column="sentence", label_column="y")) == [("hello there", "pos", None)]


@pytest.mark.skipif(not HAS_PYARROW, reason="pyarrow is not installed (pip install pyarrow)")
def test_parquet_round_trip(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = make_records(split=True)
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "d.parquet")
    assert as_pairs(read_rows(tmp_path / "d.parquet")) == as_pairs(read_rows(write_jsonl(tmp_path / "d.jsonl", records)))


def write_hf_dataset(folder: Path, records: list[dict], label_names: list[str] | None = None) -> None:
    """What datasets' save_to_disk writes for one Dataset: an Arrow IPC stream, state.json, dataset_info.json."""
    import pyarrow as pa

    folder.mkdir(parents=True)
    table = pa.Table.from_pylist(records)
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_split": None}))
    features = {"label": {"names": label_names, "_type": "ClassLabel"}} if label_names else {}
    (folder / "dataset_info.json").write_text(json.dumps({"features": features}))


@pytest.mark.skipif(not HAS_PYARROW, reason="pyarrow is not installed (pip install pyarrow)")
def test_hf_dataset_dict_folder_gives_splits_and_class_names(tmp_path):
    names = ["negative", "positive"]
    parts = {"train": 20, "validation": 5, "test": 5}
    for split, count in parts.items():
        write_hf_dataset(tmp_path / "hf" / split, [{"text": f"{split} text {i}", "label": i % 2} for i in range(count)], names)
    (tmp_path / "hf" / "dataset_dict.json").write_text(json.dumps({"splits": list(parts)}))
    dataset = load_dataset(tmp_path / "hf")
    assert dataset.labels == ("negative", "positive")
    assert (len(dataset.train), len(dataset.val), len(dataset.test)) == (20, 5, 5)
    assert dataset.val[0].text == "validation text 0"


@pytest.mark.skipif(not HAS_DATASETS, reason="the datasets package is not installed; the hand-written folder test covers the format")
def test_real_save_to_disk_folder(tmp_path):
    import datasets

    records = make_records(split=True)
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    assert as_pairs(read_rows(tmp_path / "saved")) == as_pairs(read_rows(write_jsonl(tmp_path / "d.jsonl", records)))


# ---------------------------------------------------------------- cleaning


def test_cleaning_counts_each_reason():
    nan = float("nan")
    rows = [
        Row("good one", "a"),
        Row("good two", 1.0),  # label normalised to "1"
        Row("good three", " b "),  # label stripped
        Row("   ", "a"),
        Row(None, "a"),
        Row(nan, "a"),
        Row("no label", None),
        Row("nan label", nan),
        Row("empty label", ""),
        Row("good one", "a"),  # duplicate
        Row("good one", "a"),  # duplicate
        Row("torn", "a"),
        Row("torn", "b"),  # both rows of "torn" go
        Row(None, None, error="d.jsonl:14 is not JSON"),
    ]
    examples, report = clean_rows(rows)
    assert [(e.text, e.label) for e in examples] == [("good one", "a"), ("good two", "1"), ("good three", "b")]
    assert report == CleaningReport(
        rows_read=14, rows_kept=3, unreadable=1, missing_text=3, missing_label=3, duplicates=2, conflicting_labels=2
    )
    assert report.rows_read == report.rows_kept + sum(report.dropped().values())
    assert "3 of 14 rows kept" in report.summary()


def test_labels_1_and_1_0_are_one_class():
    examples, _ = clean_rows([Row("x", 1), Row("y", 1.0), Row("z", "1.0"), Row("w", " 1 ")])
    assert {e.label for e in examples} == {"1"}


def test_bad_jsonl_line_is_counted_not_fatal(tmp_path):
    path = tmp_path / "d.jsonl"
    write_jsonl(path, make_records())
    path.write_text(path.read_text() + "{not json\n[1, 2]\n")
    dataset = load_dataset(path)
    assert dataset.cleaning.unreadable == 2
    assert dataset.cleaning.rows_kept == 90


def test_split_column_values_are_case_insensitive_and_aliased(tmp_path):
    records = make_records(classes=2, per_class=10)
    for i, record in enumerate(records):
        record["split"] = ["TRAIN", "Validation", "dev", "Test", "train", "train"][i % 6]
    records.append({"text": "no split", "label": "class0"})
    dataset = load_dataset(write_jsonl(tmp_path / "d.jsonl", records))
    assert dataset.cleaning.missing_split == 1
    assert len(dataset.val) == 7 and len(dataset.test) == 3


def test_unknown_split_value_names_it(tmp_path):
    records = make_records(split=True)
    records[0]["split"] = "holdout"
    with pytest.raises(DataError, match=r"\['holdout'\] are not train / val / test"):
        load_dataset(write_jsonl(tmp_path / "d.jsonl", records))


# ---------------------------------------------------------------- splitting


def test_split_is_deterministic_stratified_and_order_free(tmp_path):
    records = make_records(classes=3, per_class=100)
    first = load_dataset(write_jsonl(tmp_path / "a.jsonl", records))
    again = load_dataset(write_jsonl(tmp_path / "b.jsonl", records))
    shuffled = load_dataset(write_jsonl(tmp_path / "c.jsonl", records[::-1]))
    assert first.train == again.train and first.val == again.val and first.test == again.test
    for name in ("train", "val", "test"):
        assert {e.text for e in first.split(name)} == {e.text for e in shuffled.split(name)}
    assert first.balance == {
        "train": {"class0": 70, "class1": 70, "class2": 70},
        "val": {"class0": 10, "class1": 10, "class2": 10},
        "test": {"class0": 20, "class1": 20, "class2": 20},
    }
    assert class_balance(first.val) == first.balance["val"]
    # a different seed gives a different (still stratified) split
    other = load_dataset(tmp_path / "a.jsonl", seed=1)
    assert other.balance == first.balance and other.test != first.test


def test_class_with_one_row_goes_to_train_with_a_warning(tmp_path):
    records = make_records(classes=2, per_class=10) + [{"text": "lonely", "label": "rare"}]
    dataset = load_dataset(write_jsonl(tmp_path / "d.jsonl", records))
    assert "rare" in dataset.labels
    assert dataset.balance["train"]["rare"] == 1
    assert "rare" not in dataset.balance["val"] and "rare" not in dataset.balance["test"]
    assert len(dataset.warnings) == 1 and "'rare' has 1 row(s)" in dataset.warnings[0]


def test_to_task_data_orders_and_digests(tmp_path):
    records = make_records(classes=3, per_class=100)
    dataset = load_dataset(write_jsonl(tmp_path / "d.jsonl", records))
    task = to_task_data(dataset)
    assert task.labels == ("class0", "class1", "class2")
    assert len(task.train) == 210 and len(task.calibration) == 210
    assert task.train.labels[:6].tolist() == [0, 1, 2, 0, 1, 2]  # interleaved: any prefix is stratified
    calibration = read_rows(write_jsonl(tmp_path / "cal.jsonl", records[:20]))
    with_calibration = to_task_data(dataset, calibration)
    assert len(with_calibration.calibration) == 20
    assert with_calibration.digest != task.digest
    assert to_task_data(load_dataset(write_csv(tmp_path / "d.csv", records))).digest == task.digest


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("name", "delimiter", "message"),
    [
        ("d.csv", ";", r"looks ';'-separated, not comma-separated .*re-save it comma-separated"),
        ("d.csv", "\t", r"looks tab-separated, not comma-separated .*rename it to d\.tsv"),
        ("d.tsv", ",", r"looks comma-separated, not tab-separated .*rename it to d\.csv"),
    ],
)
def test_wrong_delimiter(tmp_path, name, delimiter, message):
    path = write_csv(tmp_path / name, [{"text": "hello", "label": "a"}], delimiter=delimiter)
    with pytest.raises(DataError, match=message):
        read_rows(path)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_latin1_file_is_named_with_the_fix(tmp_path, suffix):
    path = tmp_path / f"d{suffix}"
    content = "text,label\ncaf\u00e9 au lait,drink\n" if suffix == ".csv" else json.dumps({"text": "caf\u00e9", "label": "drink"}, ensure_ascii=False) + "\n"
    path.write_bytes(content.encode("latin-1"))
    with pytest.raises(DataError, match=rf"{path.name} is not UTF-8 text \(byte 0xe9 .*re-save it as UTF-8"):
        read_rows(path)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_missing_column_names_columns_found_and_config_keys(tmp_path, suffix):
    records = [{"sentence": "hello", "label": "a"}]
    path = write_csv(tmp_path / f"d{suffix}", records) if suffix == ".csv" else write_jsonl(tmp_path / f"d{suffix}", records)
    with pytest.raises(DataError, match=r"has no column 'text' \(columns found: \['label', 'sentence'\]\); .*data\.text_column"):
        read_rows(path)


def test_one_class_only(tmp_path):
    with pytest.raises(DataError, match=r"train has 1 class\(es\) \['class0'\] .*at least 2"):
        load_dataset(write_jsonl(tmp_path / "d.jsonl", make_records(classes=1)))


def test_label_in_test_but_not_train_is_named(tmp_path):
    records = make_records(classes=2, per_class=10, split=True)
    records.append({"text": "only in test", "label": "stranger", "split": "test"})
    with pytest.raises(DataError, match=r"test has label\(s\) \['stranger'\] that train does not"):
        load_dataset(write_jsonl(tmp_path / "d.jsonl", records))


@pytest.mark.parametrize(
    ("name", "message"),
    [("absent.jsonl", "does not exist; set data.path"), ("d.xlsx", "unknown data format '.xlsx'; known: .csv"), ("folder", "without dataset_dict.json")],
)
def test_unusable_path(tmp_path, name, message):
    if name == "d.xlsx":
        (tmp_path / name).write_bytes(b"PK")
    if name == "folder":
        (tmp_path / name).mkdir()
    with pytest.raises(DataError, match=message):
        read_rows(tmp_path / name)


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    import sys

    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    for name in ("pyarrow", "pyarrow.ipc", "pyarrow.parquet"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import pyarrow` raise ImportError
    with pytest.raises(DataError, match="needs pyarrow; pip install pyarrow"):
        read_rows(tmp_path / "d.parquet")
