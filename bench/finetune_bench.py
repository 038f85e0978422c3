"""LoRA fine-tuning of the demo: head-only vs fine-tuned test accuracy and macro F1, epoch wall time, int8 drop.

    python bench/finetune_bench.py                 # writes bench/results/finetune.json
    python bench/finetune_bench.py --epochs 2 --keep /tmp/fb

Runs ``edgekit build`` as a subprocess with a fresh cache on a config that is the
embedded demo plus ``finetune: {enabled: true, method: lora, epochs: N}``, then
reads the numbers from the build's own report.json (the finetune pass measures
head-only and fine-tuned on the test split with ``edgekit.measure``; evaluate
measures the int8 bundle model against fp32). Nothing is re-measured here, so
the bench reports exactly what a user's report says.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--keep", type=Path, help="keep the build folder and cache here")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "finetune.json")
    args = parser.parse_args()

    work = args.keep or Path(tempfile.mkdtemp(prefix="edgekit-finetune-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    config = work / "finetune.yaml"
    config.write_text(
        "model: {source: 'embedded:all-minilm-l6-v2', name: wordnet-supersense, version: 1.1.0}\n"
        f"finetune: {{enabled: true, method: lora, lora_r: 8, lora_alpha: 16, learning_rate: 0.0005, epochs: {args.epochs}, batch_size: 32,"
        " early_stopping_patience: 5}\n"
        "targets: [x86-64-cpu]\n"
    )
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    edgekit = Path(sys.executable).with_name("edgekit")
    started = time.perf_counter()
    build = subprocess.run([str(edgekit), "build", str(config), "--out", str(work / "out"), "--cache-dir", str(cache), "--json"],
                           capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - started
    if build.returncode not in (0, 1):
        print(build.stderr[-4000:], file=sys.stderr)
        return build.returncode
    report = json.loads(build.stdout)[0]
    tune = report["metrics"]["finetune"]
    reference, final = report["metrics"]["reference"], report["metrics"]["final"]
    train_rows = sum(report["data"]["balance"]["train"].values())
    result = {
        "date": date.today().isoformat(),
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "epochs": args.epochs,
        "train_rows": train_rows,
        "build_wall_s": round(wall, 1),
        "passes_s": {p["name"]: p["seconds"] for p in report["passes"]},
        "finetune": {k: tune[k] for k in ("method", "device", "val_accuracy_head_only", "val_accuracy", "epochs_run", "seconds",
                                            "samples_per_second", "loss_curve", "kept")},
        "seconds_per_epoch": tune["seconds"] / max(tune["epochs_run"], 1),
        "fp32_test_accuracy": reference["accuracy"],
        "int8_test_accuracy": final["accuracy"],
        "int8_drop_points": round(100 * (reference["accuracy"] - final["accuracy"]), 3),
        "precision": report["precision"],
        "passed": report["passed"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "finetune"} | {"finetune": {k: v for k, v in result["finetune"].items() if k != "loss_curve"}}, indent=2))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
