"""The tabular task: CSV and Parquet tables read and described (bad tables named with the fix), a synthetic fraud table
built to a signed bundle whose encoding the device shares."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from device_agent.bundle import TablePreprocessing
from device_agent.preprocess import TableEncoder, category_key
from edgekit.config import BuildConfig, SearchRange, TableSection
from edgekit.data import DataError
from edgekit.tasks.tabular_data import load_task_data, table_spec
from tests.support.tables import write_fraud_table


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


def _build_fraud_table(tmp_path: Path, model: dict, **sections) -> dict:
    """The synthetic fraud table built with ``model`` (the model section) for x86-64-cpu through the CLI; its report."""
    from typer.testing import CliRunner

    from edgekit.cli import app

    write_fraud_table(tmp_path / "t.csv", rows=1500)
    config = tmp_path / "fraud.yaml"
    config.write_text(json.dumps({
        "model": {"name": "toy-fraud", "version": "1.0.0", **model},
        "task": {"kind": "tabular-classification", "table": {"ignore": ["id"]}},
        "data": {"path": str(tmp_path / "t.csv"), "calibration_path": None},
        "targets": ["x86-64-cpu"], **sections,
    }))
    search = [] if "search" in sections else ["--no-search"]
    result = CliRunner().invoke(app, ["build", str(config), "--out", str(tmp_path / "out"), "--cache-dir",
                                      str(tmp_path / "cache"), *search])
    assert result.exit_code == 0, result.output
    return json.loads((tmp_path / "out" / "x86-64-cpu" / "report.json").read_text())


def _agent_serves_raw_rows(tmp_path: Path, report: dict) -> None:
    """A real agent, flashed with the report's bundle, labels raw JSON rows of the test split and refuses a bad one."""
    import shutil

    import httpx
    from typer.testing import CliRunner

    from device_agent.bundle import open_bundle
    from device_agent.keys import Keyring
    from edgekit.cli import app
    from tests.support.agent import AgentProcess

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


@pytest.mark.slow
def test_a_fraud_table_builds_a_bundle_the_agent_serves_from_raw_rows(tmp_path):
    report = _build_fraud_table(tmp_path, {"source": "builtin:mlp"},
                                train={"epochs": 30, "batch_size": 32, "learning_rate": 0.003})
    assert report["passed"] and report["metrics"]["final"]["accuracy"] >= 0.9, report["metrics"]["final"]
    assert report["metrics"]["pr_auc"]["final"] >= 0.9 and report["metrics"]["pr_auc"]["positive"] == "fraud"
    assert len(report["metrics"]["confusion"]) == 2
    _agent_serves_raw_rows(tmp_path, report)


# --------------------------------------------------------------------------- builtin:gbt


def _tree_config(**sections) -> BuildConfig:
    return BuildConfig.model_validate({"model": {"source": "builtin:gbt"}, "task": {"kind": "tabular-classification"},
                                       **sections})


def test_gbt_trains_straight_to_onnx_in_the_load_pass_and_matches_scikit_learn(tmp_path):
    from rich.progress import Progress

    from edgekit.artifact import Artifact, PassContext, Stage, TaskSpec
    from edgekit.passes import load
    from edgekit.passes.quantize import _nothing_to_quantize
    from edgekit.tasks.tabular_classification import encode, fit_boosted_trees

    import onnx
    import onnxruntime

    data = load_task_data(write_fraud_table(tmp_path / "t.csv"), None, "label", TableSection(ignore=["id"]))
    config = _tree_config(task={"kind": "tabular-classification", "table": {"ignore": ["id"]}},
                          model={"source": "builtin:gbt", "trees": {"max_trees": 120, "patience": 10}})
    source = Artifact(Stage.SOURCE, Path("builtin:gbt"), "", "digest", TaskSpec("tabular-classification", data.labels, 0, None))
    (tmp_path / "load").mkdir()
    ctx = PassContext(tmp_path / "load", data, Progress(disable=True), tmp_path / "k", print)
    artifact = load.run_to_onnx(source, load.to_onnx_options_for(config, None), ctx)

    assert artifact.stage is Stage.ONNX and artifact.results.export.parity_max_abs_error < 1e-5
    record = artifact.results.load
    assert record.model == "builtin:gbt" and 1 <= record.best_epoch <= record.epochs_run <= 120 and record.val_accuracy > 0.95
    graph = onnx.load(artifact.model_path).graph
    assert _nothing_to_quantize(graph) == "nothing to quantize: tree ensemble"
    session = onnxruntime.InferenceSession(str(artifact.model_path), providers=["CPUExecutionProvider"])
    (given,), (out,) = session.get_inputs(), session.get_outputs()
    assert (given.name, given.type, given.shape) == ("features", "tensor(float)", ["batch", artifact.task.table.width])
    assert (out.name, out.type, out.shape) == ("logits", "tensor(float)", ["batch", 2])

    # The same settings and seed fit the same trees: scikit-learn's own answers on the test rows are the reference.
    table = artifact.task.table
    model, _ = fit_boosted_trees(encode(table, data.train.inputs), data.train.labels, encode(table, data.val.inputs),
                                 data.val.labels, config.model.trees, config.train.seed)
    assert model.n_estimators_ == record.best_epoch
    test_x = encode(table, data.test.inputs)
    (logits,) = session.run(["logits"], {"features": test_x})
    probabilities = model.predict_proba(test_x)
    assert (logits.argmax(1) == probabilities.argmax(1)).all()
    confident = probabilities > 1e-4  # below that float32 rounding of the probability dominates its log
    assert np.allclose(logits[confident], np.log(probabilities[confident]), atol=1e-3)
    assert np.allclose(np.exp(logits), probabilities, atol=1e-6)
    assert (logits.argmax(1) == data.test.labels).mean() > 0.95


@pytest.mark.parametrize("classes", [2, 3])
def test_boosting_stops_on_validation_and_keeps_its_best_round(classes):
    from edgekit.config import TreesSection
    from edgekit.tasks.tabular_classification import fit_boosted_trees, trees_to_onnx

    import onnxruntime

    rng = np.random.default_rng(classes)
    x = rng.normal(size=(1200, 6)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] * x[:, 2] + rng.normal(0, 0.7, 1200) > 0).astype(np.int64) + (classes == 3) * (x[:, 3] > 0.5)
    model, losses = fit_boosted_trees(x[:700], y[:700], x[700:950], y[700:950], TreesSection(max_trees=400, patience=15), 0)
    kept = model.n_estimators_
    assert kept + 15 <= len(losses) < 400, "noisy labels: the validation loss turns up long before 400 rounds"
    chosen = model.predict_proba(x[700:950])[np.arange(250), y[700:950]]
    assert losses[kept - 1] == pytest.approx(-np.mean(np.log(chosen)), rel=1e-6)  # the loss tracked is the kept model's
    assert len(model.estimators_) == kept and model.estimators_.shape[1] == (1 if classes == 2 else 3)
    session = onnxruntime.InferenceSession(trees_to_onnx(model, 6, 17).SerializeToString(), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"features": x[950:]})
    assert logits.shape == (250, classes)
    assert np.allclose(np.exp(logits), model.predict_proba(x[950:]), atol=1e-6)


@pytest.mark.parametrize("section", ["finetune", "prune", "qat"])
def test_gbt_refuses_the_pytorch_stages_by_name(section):
    with pytest.raises(ValueError, match=rf"builtin:gbt is trained straight to ONNX and has no PyTorch stage to {section}; "
                                         rf"set {section}.enabled: false \(tune the trees with model.trees\), or use builtin:mlp"):
        _tree_config(**{section: {"enabled": True}})


def test_gbt_plans_one_pass_to_onnx_and_no_quantization_aware_training():
    from edgekit.passes import load
    from edgekit.pipeline import per_target, shared_prefix
    from edgekit.targets import load_target

    config = _tree_config()
    assert [p.name for p in shared_prefix(config)] == ["load-to-onnx"]
    assert "qat" not in [p.name for p in per_target(config, load_target("x86-64-cpu"))]
    assert load.trained_to_onnx("builtin:gbt") and not load.trained_to_onnx("builtin:mlp")
    # The load key holds the trees' settings, and nothing of the MLP's: changing its epochs retrains no trees.
    options = load.to_onnx_options_for(config, None)
    assert options.task.trees.max_trees == 300
    assert options == load.to_onnx_options_for(_tree_config(train={"epochs": 99}), None)
    assert options != load.to_onnx_options_for(_tree_config(model={"source": "builtin:gbt", "trees": {"max_depth": 5}}), None)


def test_gbt_without_its_libraries_names_the_extra(monkeypatch):
    import sys

    from edgekit.errors import EdgekitError
    from edgekit.tasks.tabular_classification import require_tree_libraries

    monkeypatch.setitem(sys.modules, "skl2onnx", None)  # an import of it now fails as if it were not installed
    with pytest.raises(EdgekitError, match=r"builtin:gbt needs scikit-learn and skl2onnx \(skl2onnx is missing\): "
                                           r"pip install 'edgekit\[tabular\]'"):
        require_tree_libraries()


def test_a_search_tunes_only_the_dimensions_of_the_model_it_trains():
    from edgekit.search import wanted
    from edgekit.search_space import resolve
    from edgekit.tasks.tabular_classification import TASK

    def searched(config: BuildConfig) -> set[str]:
        """The Optuna parameters a trial of ``config``'s own model draws."""
        drawn = [d for d in resolve(config, TASK.search_space) if isinstance(d.values, (SearchRange, list))]
        return {d.parameter for d in drawn if d.applies({"model.source": config.model.source})}

    assert searched(_tree_config()) == {"model.trees.learning_rate [builtin:gbt]", "model.trees.max_depth [builtin:gbt]",
                                        "model.trees.min_samples_leaf [builtin:gbt]", "model.trees.subsample [builtin:gbt]"}
    mlp = BuildConfig.model_validate({"model": {"source": "builtin:mlp"}, "task": {"kind": "tabular-classification"}})
    assert all(key.endswith("[builtin:mlp]") for key in searched(mlp)) and len(searched(mlp)) == 5
    both = BuildConfig.model_validate({"model": {"source": "auto"}, "task": {"kind": "tabular-classification"}})
    assert both.search.models == ["builtin:gbt"] and "model.source" in searched(both)
    # Trees' settings written in the config say how to train, as a train section does: no search unless asked.
    assert wanted(_tree_config(), own_data=True)
    assert not wanted(_tree_config(model={"source": "builtin:gbt", "trees": {"max_depth": 4}}), own_data=True)


@pytest.mark.slow
def test_a_fraud_table_builds_gradient_boosted_trees_the_agent_serves_from_raw_rows(tmp_path):
    report = _build_fraud_table(tmp_path, {"source": "builtin:gbt"})
    assert report["passed"], report["gates"]
    assert [p["name"] for p in report["passes"]] == ["load-to-onnx", "optimize", "quantize", "compile", "evaluate", "package"]
    assert report["precision"] == "fp32"
    assert report["quantization"] == {"scheme": "none", "precision": "fp32", "requested_scheme": "dynamic",
                                      "note": "nothing to quantize: tree ensemble"}
    assert report["metrics"]["final"]["accuracy"] >= 0.95 and report["metrics"]["final"]["top1_agreement"] == 1.0
    assert report["metrics"]["pr_auc"]["final"] >= 0.95
    _agent_serves_raw_rows(tmp_path, report)


@pytest.mark.slow
def test_a_search_chooses_tree_settings_through_onnx_runtime(tmp_path):
    report = _build_fraud_table(tmp_path, {"source": "builtin:gbt"},
                                search={"enabled": True, "max_trials": 3, "budget_minutes": 2})
    trials = report["search"]["trials"]
    assert [t["state"] for t in trials] == ["COMPLETE"] * 3, trials
    assert all(t["params"]["model.source"] == "builtin:gbt" and "model.trees.max_depth" in t["params"] for t in trials)
    assert all(t["val_accuracy"] > 0.9 and t["latency_p50_ms"] > 0 for t in trials)
    assert report["passed"] and report["precision"] == "fp32"


def test_whole_training_rows_are_accepted_and_numbers_past_float32_refused():
    spec = TablePreprocessing(columns=[{"name": "amount", "kind": "numeric", "fill": 30.0}], ignored=["id", "label"])
    encode = TableEncoder(spec)
    assert encode([{"id": 7, "amount": 3.0, "label": "ok"}]).tolist() == [[3.0]]
    with pytest.raises(Exception, match="row 0, column 'amount': 1e\\+39 is not a finite number the model can hold"):
        encode([{"amount": 1e39}])


def test_a_header_with_repeated_names_is_refused_and_question_marks_are_missing(tmp_path):
    with pytest.raises(DataError, match=r"repeats column name\(s\) \['x'\]"):
        load_task_data(_csv(tmp_path / "r.csv", "x,x,label\n1,2,a\n3,4,b\n"), None, "label", TableSection())
    rows = "".join(f"{'?' if i % 5 == 0 else i},{'ab'[i % 2]}\n" for i in range(40))
    data = load_task_data(_csv(tmp_path / "q.csv", "x,label\n" + rows), None, "label", TableSection())
    assert data.summary["columns"] == {"x": "numeric"}, "a '?' cell is missing, not text"


@pytest.mark.slow
def test_the_breast_cancer_example_builds_a_bundle_the_agent_serves_from_raw_rows(tmp_path):
    """The shipped tabular example, as a user runs it: build, flash, classify whole rows of its own CSV."""
    import shutil

    import httpx
    from typer.testing import CliRunner

    from edgekit.cli import app
    from tests.support.agent import AgentProcess

    root = Path(__file__).resolve().parents[2]
    result = CliRunner().invoke(app, ["build", str(root / "examples" / "breast-cancer.yaml"), "--out", str(tmp_path / "out"),
                                      "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "x86-64-cpu" / "report.json").read_text())
    assert report["passed"] and report["metrics"]["final"]["accuracy"] >= 0.93, report["metrics"]["final"]
    assert report["metrics"]["pr_auc"]["positive"] == "malignant"
    keyring = tmp_path / "keyring"
    keyring.mkdir()
    shutil.copy(tmp_path / "cache" / "dev-key" / "edgekit.pub", keyring / "dev.pub")
    with (root / "examples" / "data" / "breast-cancer-wisconsin.csv").open() as handle:
        rows = list(csv.DictReader(handle))[:40]
    agent = AgentProcess(tmp_path, keyring).start()
    try:
        flashed = CliRunner().invoke(app, ["flash", report["bundle"], "--device", agent.url, "--token-file", str(tmp_path / "admin.token")])
        assert flashed.exit_code == 0, flashed.output
        whole_rows = [{name: (value if name == "diagnosis" else float(value)) for name, value in row.items()} for row in rows]
        request = {"inputs": [{"name": "rows", "shape": [len(rows)], "datatype": "BYTES", "data": whole_rows}],
                   "outputs": [{"name": "logits", "parameters": {"classification": 1}}]}
        answer = httpx.post(f"{agent.url}/v2/models/breast-cancer/infer", json=request, timeout=30)
        assert answer.status_code == 200, answer.text
        predicted = [item.split(":")[-1] for item in answer.json()["outputs"][0]["data"]]
        assert np.mean([p == row["diagnosis"] for p, row in zip(predicted, rows, strict=True)]) >= 0.9
    finally:
        agent.stop()
