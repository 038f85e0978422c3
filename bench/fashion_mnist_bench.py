"""Fashion-MNIST CNN benchmark: the example build's accuracy bars and int8 vs fp32 ONNX Runtime latency, in one run.

Builds ``examples/fashion-mnist.yaml`` from an empty cache (timed), then reads
the x86-64-cpu report for the fp32 and int8 test accuracy (computed by the
evaluate pass through ``edgekit.measure``), and times the fp32 model (the
optimize pass's output) against the int8 model (the quantize pass's output) at
batch 1 on real test images, in alternating rounds so the VM's drift hits both
alike. Latency comes from ``edgekit.measure.latency``, as in the build.

Run: python bench/fashion_mnist_bench.py [--config examples/fashion-mnist.yaml] [--reuse OUT] [--results bench/results/fashion_mnist.json]
(``--config examples/fashion-mnist-search.yaml --results bench/results/fashion_mnist_search.json``: the training
chosen by the build's search; the trials are recorded too. ``--max-model-size-mb MB`` builds for a copy of the
x86-64-cpu profile with that size budget (``--target``), which the search holds its trials to.)
Needs Debian's dataset-fashion-mnist. Timing on shared VMs drifts: compare numbers only within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "fashion-mnist.yaml"
ROUNDS = 5
ITERATIONS = 300


def build(config: Path, out: Path, target: Path | None = None) -> float:
    """Run the example build from an empty cache (for ``target`` instead of the config's targets); its wall time in seconds."""
    started = time.perf_counter()
    command = [sys.executable, "-m", "edgekit", "build", str(config), "--out", str(out), "--cache-dir", str(out / "cache")]
    command += ["--target", str(target)] if target else []
    subprocess.run(command, check=True, cwd=ROOT)
    return time.perf_counter() - started


def size_budget_target(max_model_size_mb: float, out: Path) -> Path:
    """The x86-64-cpu profile (same name, so the same report folder) with ``max_model_size_mb`` as its size budget."""
    import yaml

    target = yaml.safe_load((ROOT / "targets" / "x86-64-cpu.yaml").read_text())
    target["budgets"]["max_model_size_mb"] = max_model_size_mb
    out.mkdir(parents=True, exist_ok=True)
    (out / "x86-64-cpu-budget.yaml").write_text(yaml.safe_dump(target))
    return out / "x86-64-cpu-budget.yaml"


def pass_model(out: Path, target: str, name: str) -> Path:
    (folder,) = sorted((out / target / "passes").glob(f"*-{name}"))
    return folder / "model.onnx"


def latencies(config_file: Path, fp32: Path, int8: Path) -> dict:
    import onnxruntime

    from edgekit.config import load_build_config
    from edgekit.measure import latency
    from edgekit.tasks import image_classification, model_feeds

    config = load_build_config(config_file)
    data = image_classification.load_task_data(config.data, config.task.image)
    task = image_classification.task_spec(data.labels, config.task.image)
    feeds = model_feeds(task, data.test.inputs[:1])
    sessions = {name: onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]) for name, path in
                (("fp32", fp32), ("int8", int8))}
    rounds: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(ROUNDS):
        for name, session in sessions.items():
            rounds[name].append(latency(lambda session=session: session.run(None, feeds), iterations=ITERATIONS, warmup=50).p50_ms)
    result = {f"{name}_p50_ms": round(statistics.median(values), 4) for name, values in rounds.items()}
    result["rounds_ms"] = {name: [round(v, 4) for v in values] for name, values in rounds.items()}
    result["int8_speedup_vs_fp32"] = round(result["fp32_p50_ms"] / result["int8_p50_ms"], 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--reuse", type=Path, help="read an existing build's --out folder instead of building")
    parser.add_argument("--build-seconds", type=float, help="with --reuse: the wall time that build took (measured outside)")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "fashion_mnist.json")
    parser.add_argument("--max-model-size-mb", type=float, help="build for x86-64-cpu with this size budget")
    args = parser.parse_args()
    out = args.reuse or Path(tempfile.mkdtemp(prefix="fashion-mnist-bench-"))
    target = size_budget_target(args.max_model_size_mb, out) if args.max_model_size_mb is not None and not args.reuse else None
    wall = args.build_seconds if args.reuse else build(args.config, out, target)
    report = json.loads((out / "x86-64-cpu" / "report.json").read_text())
    jetson_report = out / "jetson-orin-nano-8gb" / "report.json"
    jetson = json.loads(jetson_report.read_text()) if jetson_report.is_file() else None
    reference, final = report["metrics"]["reference"], report["metrics"]["final"]
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "config": str(args.config.resolve().relative_to(ROOT)) if args.config.resolve().is_relative_to(ROOT) else str(args.config),
        "max_model_size_mb": args.max_model_size_mb,
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "build_wall_seconds": round(wall, 1) if wall is not None else None,
        "pass_seconds": {p["name"]: p["seconds"] for p in report["passes"]},
        "train": {k: report["metrics"]["load"].get(k) for k in ("parameters", "widths", "epochs_run", "val_accuracy", "seconds", "samples_per_second")},
        "finetune": {k: (report["metrics"]["finetune"] or {}).get(k) for k in ("val_accuracy_before", "val_accuracy", "epochs_run", "seconds", "kept")},
        "fp32_test_accuracy": reference["accuracy"],
        "int8_test_accuracy": final["accuracy"],
        "int8_accuracy_drop_points": round((reference["accuracy"] - final["accuracy"]) * 100, 3),
        "int8_top1_agreement": final["top1_agreement"],
        "quantization": {k: report["quantization"].get(k) for k in ("scheme", "activation_type", "per_channel", "calibration_rows",
                                                                   "quantized_nodes", "kept_in_float")},
        "size_mb": {"fp32": reference["size_mb"], "int8": final["size_mb"]},
        "bars": {"fp32_accuracy_at_least": 0.90, "int8_drop_points_at_most": 0.5},
        "x86_64_cpu_passed": report["passed"],
        "jetson": jetson and {"passed": jetson["passed"], "precision": jetson["precision"],
                              "int8_test_accuracy": jetson["metrics"]["final"]["accuracy"],
                              "engine_built_here": (jetson["metrics"]["compile"] or {}).get("engine_built"),
                              "reason": (jetson["metrics"]["compile"] or {}).get("reason")},
        "latency_batch1": latencies(args.config, pass_model(out, "x86-64-cpu", "optimize"), pass_model(out, "x86-64-cpu", "quantize")),
        "search": report.get("search") and {
            "spent_minutes": report["search"]["spent_minutes"], "budget_minutes": report["search"]["budget_minutes"],
            "chosen": report["search"]["chosen"], "budgets": report["search"].get("budgets"),
            "chosen_within_budgets": report["search"].get("chosen_within_budgets"),
            "trials": [{k: t.get(k) for k in ("number", "state", "val_accuracy", "latency_p50_ms", "size_mb", "over_budget",
                                              "seconds", "params", "note")} for t in report["search"]["trials"]]},
    }
    results["bars_met"] = results["fp32_test_accuracy"] >= 0.90 and results["int8_accuracy_drop_points"] <= 0.5
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
