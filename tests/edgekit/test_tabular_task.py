"""The tabular task: CSV and Parquet tables read and described (bad tables named with the fix), a synthetic fraud table
built to a signed bundle whose encoding the device shares."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest

from device_agent.bundle import TablePreprocessing
from device_agent.preprocess import TableEncoder, category_key
from edgekit.config import BuildConfig, TableSection
from edgekit.data import DataError
from edgekit.tasks.tabular_data import load_task_data, table_spec

COLUMNS = ["id", "amount", "age", "merchant", "country", "label"]


def write_fraud_table(path: Path, rows: int = 1200, seed: int = 0) -> Path:
    """A synthetic card-payments table: fraud when a large amount goes to an online or travel merchant, or a young
    customer pays in the US; amounts are missing now and then."""
    rng = random.Random(seed)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        for number in range(rows):
            amount, age = round(rng.expovariate(1 / 50), 2), rng.randint(18, 80)
            merchant, country = rng.choice(["grocer", "fuel", "online", "travel", "cafe"]), rng.choice(["fr", "de", "us"])
            fraud = (amount > 80 and merchant in ("online", "travel")) or (country == "us" and age < 25)
            writer.writerow([number, "" if rng.random() < 0.05 else amount, age, merchant, country, "fraud" if fraud else "ok"])
    return path


def _csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_table_is_split_stratified_and_its_columns_described_from_train(tmp_path):
    data = load_task_data(write_fraud_table(tmp_path / "t.csv"), None, "label", TableSection(ignore=["id"]))
    assert data.labels == ("fraud", "ok")
    assert len(data.train) + len(data.val) + len(data.test) == 1200
    assert data.summary["columns"] == {"amount": "numeric", "age": "numeric", "merchant": "categorical", "country": "categorical"}
    row = data.train.inputs[0]
    assert set(row) == {"amount", "age", "merchant", "country"}  # ids and labels never reach the model
    spec = table_spec(list(data.train.inputs), ["amount", "age", "merchant", "country"], TableSection())
    amounts = [r["amount"] for r in data.train.inputs if r["amount"] is not None]
    assert spec.columns[0].fill == pytest.approx(float(np.median(amounts)))
    assert sorted(spec.columns[2].categories) == ["cafe", "fuel", "grocer", "online", "travel"]


def test_parquet_reads_like_csv_and_a_test_file_is_held_out(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = {"x": [1.0, 2.0, None, 4.0] * 10, "kind": ["a", "b", "a", "b"] * 10, "label": ["p", "q"] * 20}
    pq.write_table(pa.table(table), tmp_path / "t.parquet")
    pq.write_table(pa.table(table), tmp_path / "test.parquet")
    data = load_task_data(tmp_path / "t.parquet", tmp_path / "test.parquet", "label", TableSection())
    assert len(data.test) == 40 and len(data.train) + len(data.val) == 40
    assert {r["x"] for r in data.test.inputs} == {1.0, 2.0, None, 4.0}


def test_codes_read_as_numbers_match_on_both_sides():
    # A CSV column of codes with an empty cell reads as floats (3.0); a JSON client sends 3: both are "3".
    assert category_key(3.0) == category_key(3) == "3" and category_key(2.5) == "2.5"
    assert category_key(None) is None and category_key(float("nan")) is None and category_key(True) == "true"


@pytest.mark.parametrize(
    ("text", "section", "message"),
    [
        ("a,b\n1,x\n2,y\n", TableSection(), r"has no label column 'label'; its columns: a, b; set data.label_column"),
        ("a,label\n1,x\n2,x\n3,x\n4,x\n5,x\n", TableSection(), r"train has 1 class\(es\) \['x'\]; classification needs at least 2"),
        ("a,label\n1,x\n2,y,3\n", TableSection(), r"cannot be read: .*; check the header and that every row has as many fields"),
        ("a,label\n", TableSection(), r"has a header but no rows"),
        ("a,label\n1,x\n2,y\n", TableSection(ignore=["zz"]), r"task.table names column\(s\) \['zz'\] that .* does not have"),
        ("a,label\n1,\n2,\n", TableSection(), r"every row's 'label' is empty"),
    ],
)
def test_a_bad_table_is_named_with_the_fix(tmp_path, text, section, message):
    with pytest.raises(DataError, match=message):
        load_task_data(_csv(tmp_path / "t.csv", text), None, "label", section)


def test_a_categorical_column_of_ten_thousand_values_is_refused_with_the_fix(tmp_path):
    lines = ["user,amount,label"] + [f"u{i},{i % 7},{'ab'[i % 2]}" for i in range(10_000)]
    with pytest.raises(DataError, match=r"column 'user' has \d+ distinct values in train, more than "
                                        r"task.table.max_categories \(100\).*list it in task.table.ignore"):
        load_task_data(_csv(tmp_path / "t.csv", "\n".join(lines) + "\n"), None, "label", TableSection())
    data = load_task_data(tmp_path / "t.csv", None, "label", TableSection(ignore=["user"]))
    assert data.summary["columns"] == {"amount": "numeric"}


def test_a_test_file_with_other_columns_is_refused(tmp_path):
    train = _csv(tmp_path / "a.csv", "a,b,label\n" + "".join(f"{i},{i},{'xy'[i % 2]}\n" for i in range(20)))
    test = _csv(tmp_path / "b.csv", "a,label\n1,x\n2,y\n")
    with pytest.raises(DataError, match=r"does not have the training table's columns: missing b"):
        load_task_data(train, test, "label", TableSection())


def test_the_encoder_fills_missing_numbers_one_hots_categories_and_names_bad_rows():
    spec = TablePreprocessing(columns=[{"name": "amount", "kind": "numeric", "fill": 30.0},
                                       {"name": "merchant", "kind": "categorical", "categories": ["online", "cafe"]}])
    encode = TableEncoder(spec)
    features = encode([{"amount": 12.5, "merchant": "cafe"}, {"merchant": "zoo"}, {"amount": None}])
    assert features.tolist() == [[12.5, 0, 1, 0], [30.0, 0, 0, 1], [30.0, 0, 0, 1]]
    for row, message in [({"amount": "12"}, "row 0, column 'amount': '12' is not a number"),
                         ({"amout": 1}, "row 0: unknown column\\(s\\) 'amout'; the model's columns: amount, merchant"),
                         ("amount=1", "row 0 is str, not an object")]:
        with pytest.raises(Exception, match=message):
            encode([row])


def test_a_tabular_config_is_checked_against_the_task():
    with pytest.raises(ValueError, match="is not a table model; tabular-classification takes builtin:mlp"):
        BuildConfig.model_validate({"task": {"kind": "tabular-classification"}})
    with pytest.raises(ValueError, match="prune does not support tabular-classification"):
        BuildConfig.model_validate({"task": {"kind": "tabular-classification"}, "model": {"source": "builtin:mlp"},
                                    "prune": {"enabled": True}})


@pytest.mark.slow
def test_a_fraud_table_builds_a_bundle_the_agent_serves_from_raw_rows(tmp_path):
    import shutil

    import httpx
    from typer.testing import CliRunner

    from device_agent.bundle import open_bundle
    from device_agent.keys import Keyring
    from edgekit.cli import app
    from tests.support.agent import AgentProcess

    write_fraud_table(tmp_path / "t.csv", rows=1500)
    config = tmp_path / "fraud.yaml"
    config.write_text(json.dumps({
        "model": {"source": "builtin:mlp", "name": "toy-fraud", "version": "1.0.0"},
        "task": {"kind": "tabular-classification", "table": {"ignore": ["id"]}},
        "data": {"path": str(tmp_path / "t.csv"), "calibration_path": None},
        "train": {"epochs": 30, "batch_size": 32, "learning_rate": 0.003},
        "targets": ["x86-64-cpu"],
    }))
    result = CliRunner().invoke(app, ["build", str(config), "--out", str(tmp_path / "out"), "--cache-dir",
                                      str(tmp_path / "cache"), "--no-search"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "x86-64-cpu" / "report.json").read_text())
    assert report["passed"] and report["metrics"]["final"]["accuracy"] >= 0.9, report["metrics"]["final"]
    assert report["metrics"]["pr_auc"]["final"] >= 0.9 and len(report["metrics"]["confusion"]) == 2

    keyring = tmp_path / "keyring"
    keyring.mkdir()
    shutil.copy(tmp_path / "cache" / "dev-key" / "edgekit.pub", keyring / "dev.pub")
    bundle = Path(report["bundle"])
    with open_bundle(bundle, Keyring.load(keyring)) as opened:
        manifest = opened.manifest
        assert manifest.task.kind == "tabular-classification" and isinstance(manifest.preprocessing, TablePreprocessing)
        assert [c.name for c in manifest.preprocessing.columns] == ["amount", "age", "merchant", "country"]
        assert {"input.column.amount", "input.category.merchant"} <= set(manifest.drift_reference["features"])
    data = load_task_data(tmp_path / "t.csv", None, "label", TableSection(ignore=["id"]))
    agent = AgentProcess(tmp_path, keyring).start()
    try:
        flashed = CliRunner().invoke(app, ["flash", str(bundle), "--device", agent.url, "--token-file", str(tmp_path / "admin.token")])
        assert flashed.exit_code == 0, flashed.output
        rows = [json.dumps(row) for row in data.test.inputs[:64]]
        request = {"inputs": [{"name": "rows", "shape": [len(rows)], "datatype": "BYTES", "data": rows}],
                   "outputs": [{"name": "logits", "parameters": {"classification": 1}}]}
        answer = httpx.post(f"{agent.url}/v2/models/toy-fraud/infer", json=request, timeout=30)
        assert answer.status_code == 200, answer.text
        predicted = [item.split(":")[-1] for item in answer.json()["outputs"][0]["data"]]
        truth = [data.labels[i] for i in data.test.labels[:64]]
        assert np.mean([p == t for p, t in zip(predicted, truth, strict=True)]) >= 0.85, (predicted, truth)
        wrong = {"inputs": [{"name": "rows", "shape": [1], "datatype": "BYTES", "data": [json.dumps({"amount": "lots"})]}]}
        refused = httpx.post(f"{agent.url}/v2/models/toy-fraud/infer", json=wrong, timeout=30)
        assert refused.status_code == 400 and "column 'amount'" in refused.text, refused.text
    finally:
        agent.stop()
