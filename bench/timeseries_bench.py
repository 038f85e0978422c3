"""Time-series benchmark: builtin:cnn1d, builtin:minirocket and builtin:spectral-mlp on four UCR/UEA sets from the sktime wheel, in one run.

Each model's BasicMotions example (``examples/basicmotions.yaml``,
``examples/basicmotions-minirocket.yaml``, ``examples/basicmotions-spectral.yaml``)
gives its model and training settings; GunPoint, ItalyPowerDemand and ArrowHead
use them with their own files, the archive's train/test split. For each set and
model it builds for x86-64-cpu and arm64-cpu from an empty cache (timed) and
reads the reports: fp32 and final (int8, or the fallback's) test accuracy (the
evaluate pass, ``edgekit.measure``), top-1 agreement, the gates, batch-1 p50/p95
latency on this host (a proxy for arm64-cpu, which this x86 host is not) and the
signed bundle's size. The spectral model's latency is its graph's, on features;
the device also computes those features from the raw window
(``device_agent.preprocess.spectral_features``), so that function's batch-1 p50 on
this host is recorded beside it (``edgekit.measure.latency``). Nothing here is
tuned per set. Results go to bench/results/timeseries.json with the date and the
load.

Run: python bench/timeseries_bench.py [--sets BasicMotions GunPoint] [--models builtin:minirocket] [--results ...]
Needs the sktime wheel (pip install "edgekit[timeseries]"): only its data files are read.
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
EXAMPLES = {"builtin:cnn1d": ROOT / "examples" / "basicmotions.yaml",
            "builtin:minirocket": ROOT / "examples" / "basicmotions-minirocket.yaml",
            "builtin:spectral-mlp": ROOT / "examples" / "basicmotions-spectral.yaml"}
SETS = ("BasicMotions", "GunPoint", "ItalyPowerDemand", "ArrowHead")
TARGETS = ("x86-64-cpu", "arm64-cpu")


def config_for(name: str, model: str, folder: Path) -> Path:
    """``model``'s example config with ``name``'s train and test files."""
    document = yaml.safe_load(EXAMPLES[model].read_text())
    document["model"]["name"] = name.lower()
    document["data"].update(path=f"sktime:{name}/{name}_TRAIN.ts", test_path=f"sktime:{name}/{name}_TEST.ts")
    document["targets"] = list(TARGETS)
    path = folder / f"{name}-{model.split(':')[1]}.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def run(name: str, model: str, folder: Path) -> dict:
    config = config_for(name, model, folder)
    out = folder / config.stem
    started = time.perf_counter()
    command = [sys.executable, "-m", "edgekit", "build", str(config), "--out", str(out), "--cache-dir", str(out / "cache")]
    build = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    record: dict = {"build_wall_seconds": round(wall, 1), "exit_code": build.returncode}
    for target in TARGETS:
        report = json.loads((out / target / "report.json").read_text())
        reference, final, load = report["metrics"]["reference"], report["metrics"]["final"], report["metrics"]["load"]
        bundle = Path(report["bundle"]) if report["bundle"] else None
        record[target] = {
            "passed": report["passed"],
            "fp32_test_accuracy": reference["accuracy"], "int8_test_accuracy": final["accuracy"],
            "int8_top1_agreement": final["top1_agreement"], "precision": report["precision"],
            "quantization": {key: report["quantization"].get(key) for key in ("scheme", "kept_in_float", "precision_fallback")},
            "latency_p50_ms": {"fp32": reference["latency_p50_ms"], "final": final["latency_p50_ms"]},
            "latency_p95_ms": {"fp32": reference["latency_p95_ms"], "final": final["latency_p95_ms"]},
            "model_size_mb": {"fp32": reference["size_mb"], "final": final["size_mb"]},
            "bundle_mb": round(bundle.stat().st_size / 1e6, 4) if bundle else None,
            "test_rows": report["metrics"]["evaluation"]["test_rows"],
            "proxy_latency": report["metrics"]["evaluation"]["proxy"],
            "failed_gates": [g["name"] for g in report["gates"] if not g["passed"]],
        }
        record["train"] = {k: load.get(k) for k in ("parameters", "best_epoch", "epochs_run", "val_accuracy", "seconds")}
        record["series"] = report["data"].get("series")
    if model == "builtin:spectral-mlp":
        record["spectral_features_p50_ms"] = spectral_features_p50_ms(out / "passes" / "01-load" / "series_model.json")
    return record


def spectral_features_p50_ms(record_file: Path) -> float:
    """Batch-1 p50 on this host of the features the device computes from one raw window, before the model runs."""
    import numpy as np

    from device_agent.preprocess import spectral_features
    from edgekit.measure import latency

    record = json.loads(record_file.read_text())
    window = np.random.default_rng(0).standard_normal((1, record["channels"], record["steps"])).astype(np.float32)
    return round(latency(lambda: spectral_features(window, record["bands"]), iterations=200).p50_ms, 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=list(SETS))
    parser.add_argument("--models", nargs="+", default=list(EXAMPLES), choices=list(EXAMPLES))
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "timeseries.json")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="timeseries-bench-"))
    load_before = os.getloadavg()
    sets = {name: {model: run(name, model, folder) for model in args.models} for name in args.sets}
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "processor": platform.processor()},
        "load_average_1_5_15": {"before": [round(v, 2) for v in load_before], "after": [round(v, 2) for v in os.getloadavg()]},
        "models": {model: f"train settings of examples/{path.name} for every set" for model, path in EXAMPLES.items() if model in args.models},
        "sets": sets,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
