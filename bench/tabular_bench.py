"""Tabular benchmark: builtin:mlp and builtin:gbt built for x86-64-cpu on two tables, beside a scikit-learn peer.

Tables: Breast Cancer Wisconsin (``examples/breast-cancer.yaml``, 569 rows of 30
measurements) and the synthetic card-payments table of the tests
(``tests/support/tables.py``, FRAUD_ROWS rows: amount, age, merchant, country).
Each model is built from an empty cache with ``edgekit build --no-search``
(timed, wall clock including Python's start) and the report read: test
accuracy and PR-AUC of the model the bundle ships (the evaluate pass,
``edgekit.measure``), its precision and why, batch-1 p50/p95 latency on this
host, the model file and the signed bundle. The MLP uses the example's train
settings (fraud: FRAUD_TRAIN); the trees use the model.trees defaults. The peer
is a plain scikit-learn LogisticRegression (standardised features, lbfgs) fitted
on the same training rows, encoded by the same ``device_agent`` encoder, and
scored on the same test rows by the same functions; its latency is
``predict_proba`` on one row in Python, not a bundle. Results go to
bench/results/tabular.json with the date and the machine's load.

Run: python bench/tabular_bench.py [--fraud-rows 10000] [--results bench/results/tabular.json]
Needs the tabular extra (pip install "edgekit[tabular]").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EXAMPLE = ROOT / "examples" / "breast-cancer.yaml"
TARGET = "x86-64-cpu"
MODELS = ("builtin:mlp", "builtin:gbt")
FRAUD_ROWS = 10_000
FRAUD_TRAIN = {"epochs": 30, "batch_size": 64, "learning_rate": 0.003, "early_stopping_patience": 5}


def configs(folder: Path, fraud_rows: int) -> dict[str, dict]:
    """Each table's build config as a document: the example as shipped, and the fraud table written into ``folder``."""
    from tests.support.tables import write_fraud_table

    example = yaml.safe_load(EXAMPLE.read_text())
    example["data"]["path"] = str((EXAMPLE.parent / example["data"]["path"]).resolve())
    table = write_fraud_table(folder / "fraud.csv", rows=fraud_rows)
    fraud = {"model": {"source": "builtin:mlp", "name": "fraud", "version": "1.0.0"},
             "task": {"kind": "tabular-classification", "table": {"ignore": ["id"]}},
             "data": {"path": str(table), "label_column": "label", "calibration_path": None},
             "train": FRAUD_TRAIN, "targets": [TARGET]}
    return {"breast-cancer": {**example, "targets": [TARGET]}, "fraud": fraud}


def build(document: dict, model: str, folder: Path) -> dict:
    """``document`` with ``model`` built from an empty cache; the numbers of its report."""
    folder.mkdir(parents=True, exist_ok=True)
    document = {**document, "model": {**document["model"], "source": model}}
    if model == "builtin:gbt":
        document.pop("train", None)  # the trees read model.trees (defaults here), not the MLP's schedule
    config = folder / "build.yaml"
    config.write_text(yaml.safe_dump(document))
    started = time.perf_counter()
    command = [sys.executable, "-m", "edgekit", "build", str(config), "--out", str(folder / "out"), "--cache-dir",
               str(folder / "cache"), "--no-search"]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if run.returncode not in (0, 1):
        raise SystemExit(f"{model} on {config}: exit {run.returncode}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    report = json.loads((folder / "out" / TARGET / "report.json").read_text())
    final, load, quantization = report["metrics"]["final"], report["metrics"]["load"], report["quantization"]
    bundle = Path(report["bundle"]) if report["bundle"] else None
    return {
        "passed": report["passed"], "build_wall_seconds": round(wall, 1),
        "pass_seconds": {p["name"]: p["seconds"] for p in report["passes"]},
        "test_accuracy": final["accuracy"], "test_f1_macro": final["f1_macro"],
        "test_pr_auc": report["metrics"]["pr_auc"]["final"] if report["metrics"]["pr_auc"] else None,
        "precision": report["precision"], "quantization": quantization.get("note") or quantization.get("scheme"),
        "top1_agreement_with_fp32": final["top1_agreement"],
        "latency_p50_ms": final["latency_p50_ms"], "latency_p95_ms": final["latency_p95_ms"],
        "model_size_mb": final["size_mb"], "bundle_mb": round(bundle.stat().st_size / 1e6, 4) if bundle else None,
        "train": {k: load.get(k) for k in ("parameters", "best_epoch", "epochs_run", "val_accuracy", "seconds")},
        "failed_gates": [g["name"] for g in report["gates"] if not g["passed"]],
    }


def logistic_peer(document: dict, folder: Path) -> dict:
    """scikit-learn's LogisticRegression on the build's split and encoding, scored by edgekit.measure."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from edgekit.config import load_build_config
    from edgekit.measure import classification_metrics, latency, rare_class_pr_auc
    from edgekit.tasks import load_task_data
    from edgekit.tasks.tabular_classification import encode
    from edgekit.tasks.tabular_data import table_spec

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "peer.yaml"
    path.write_text(yaml.safe_dump(document))
    config = load_build_config(path)
    data = load_task_data(config)
    rows = list(data.train.inputs)
    table = table_spec(rows, list(rows[0]), config.task.table)
    started = time.perf_counter()
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(encode(table, rows), data.train.labels)
    seconds = time.perf_counter() - started
    test_x = encode(table, data.test.inputs)
    probabilities = model.predict_proba(test_x)
    metrics = classification_metrics(data.test.labels, probabilities.argmax(1), data.labels)
    one_row = test_x[:1]
    timed = latency(lambda: model.predict_proba(one_row), iterations=200, warmup=10)
    return {"test_accuracy": metrics.accuracy, "test_f1_macro": metrics.f1_macro,
            "test_pr_auc": rare_class_pr_auc(data.test.labels, probabilities, data.labels)[0] if len(data.labels) == 2 else None,
            "fit_seconds": round(seconds, 3), "predict_proba_one_row_p50_ms": round(timed.p50_ms, 4),
            "rows": {"train": len(data.train), "val": len(data.val), "test": len(data.test)}, "features": table.width}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fraud-rows", type=int, default=FRAUD_ROWS)
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "tabular.json")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="tabular-bench-"))
    load_before = os.getloadavg()
    tables = {}
    for name, document in configs(folder, args.fraud_rows).items():
        tables[name] = {model: build(document, model, folder / name / model.split(":")[1]) for model in MODELS}
        tables[name]["sklearn LogisticRegression (peer)"] = logistic_peer(document, folder / name)
        print(json.dumps({name: tables[name]}, indent=2), flush=True)
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "processor": platform.processor()},
        "load_average_1_5_15": {"before": [round(v, 2) for v in load_before], "after": [round(v, 2) for v in os.getloadavg()]},
        "target": TARGET,
        "settings": {"breast-cancer mlp": "examples/breast-cancer.yaml train section", "fraud mlp": FRAUD_TRAIN,
                     "gbt": "model.trees defaults (300 rounds at most, learning rate 0.1, depth 3, patience 20)",
                     "fraud rows": args.fraud_rows},
        "tables": tables,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
