"""Federated fine-tuning on the demo against the same LoRA trained centrally and against the head alone.

    python bench/federated_bench.py                   # every row (about 25 minutes on 2 cores), writes bench/results/federated.json
    python bench/federated_bench.py --work /tmp/fb    # keep the builds there; a rerun reuses the pass cache
    python bench/federated_bench.py --only iid,dirichlet:0.5   # some federated rows
    python bench/federated_bench.py --baselines-from bench/results/federated.json   # federated rows again; the two
        # baseline rows copied from that file (with its date), its federated rows kept as "earlier_federated_rows"

Rows, each one `edgekit` command in a child process, timed from start to exit, on the embedded demo (all-MiniLM-L6-v2,
WordNet glosses, 8 classes; 2,800 train / 400 validation / 800 test rows), for x86-64-cpu with its latency budget
lifted (a busy VM would otherwise fail a gate and leave no bundle; this measures accuracy and time):

- head only: `edgekit build --no-search` (the head fitted on the frozen encoder's mean-pooled features);
- centralized LoRA: `examples/wordnet-federated.yaml` built by `edgekit build` with `finetune.enabled: true` and
  `finetune.epochs` = rounds x local epochs (6 with the example's settings), from the fitted head, on all 2,800 training rows;
- federated: `edgekit federated simulate examples/wordnet-federated.yaml --clients 3 --partition P` for P in iid,
  dirichlet:0.5 and dirichlet:0.1 (the example's rounds of 1 local epoch, FedAvg, the head trained from scratch by the sites, then
  refitted from the sites' feature statistics when validation prefers it: ``federated.head_calibration``);
- the same at dirichlet:0.5 with ``federated.head_calibration: false`` (FedAvg's head ships), to show what the
  calibration adds;
- the same at dirichlet:0.5 with ``federated.secure_aggregation: true`` (masked updates and masked head statistics,
  the coordinator unmasks only their sums): its accuracy should equal the calibrated dirichlet:0.5 row's up to
  fixed-point rounding, and its time and bytes show what the protocol costs.

Each row: the shipped bundle's test accuracy (int8 where the gates allow it) and its fp32 parent's, the wall time of
the whole command (training, export, quantization, evaluation, packaging); federated rows add each round's validation
accuracy, the bytes each site sends per round and the label counts per site. Numbers are reported, not asserted.
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
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "wordnet-federated.yaml"
PARTITIONS = ("iid", "dirichlet:0.5", "dirichlet:0.1")
CLIENTS = 3


def latency_free_target(work: Path) -> Path:
    import yaml

    document = yaml.safe_load((ROOT / "targets" / "x86-64-cpu.yaml").read_text())
    document["budgets"]["p95_latency_ms"] = 10_000
    path = work / "x86-64-cpu.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def configs(work: Path, target: Path) -> tuple[Path, Path, Path, Path]:
    """The example with the latency-free target, the same without head calibration, the same with secure aggregation,
    and its centralized twin (LoRA in the build, same total epochs)."""
    import yaml

    document = yaml.safe_load(EXAMPLE.read_text())
    document["targets"] = [str(target)]
    federated = work / "federated.yaml"
    federated.write_text(yaml.safe_dump(document))
    uncalibrated = work / "federated-uncalibrated.yaml"
    uncalibrated.write_text(yaml.safe_dump({**document, "federated": {**document["federated"], "head_calibration": False}}))
    secure = work / "federated-secure.yaml"
    secure.write_text(yaml.safe_dump({**document, "federated": {**document["federated"], "secure_aggregation": True}}))
    epochs = document["federated"]["rounds"] * document["federated"]["local_epochs"]
    document["finetune"] |= {"enabled": True, "epochs": epochs}
    document["model"]["name"] = "wordnet-supersense-central"
    central = work / "central.yaml"
    central.write_text(yaml.safe_dump(document))
    return federated, uncalibrated, secure, central


def run(name: str, args: list[str], work: Path) -> dict:
    log = work / f"{name.replace(':', '-')}.log"
    started = time.perf_counter()
    with log.open("wb") as err:
        done = subprocess.run([sys.executable, "-m", "edgekit", *args, "--json"], cwd=ROOT, stdout=subprocess.PIPE, stderr=err)
    seconds = time.perf_counter() - started
    if done.returncode not in (0, 1):
        raise SystemExit(f"{name} failed (exit {done.returncode}); see {log}")
    (report,) = json.loads(done.stdout)
    row = {"row": name, "seconds": round(seconds, 1), "passed": report["passed"], "precision": report["precision"],
           "test_accuracy": report["metrics"]["final"]["accuracy"], "fp32_test_accuracy": report["metrics"]["reference"]["accuracy"],
           "top1_agreement": report["metrics"]["final"].get("top1_agreement"), "size_mb": report["metrics"]["final"].get("size_mb")}
    federated = report.get("federated")
    if federated:
        row["federated"] = {
            "val_accuracy_per_round": [round(r["accuracy"], 4) for r in federated["per_round"]],
            "train_loss_per_round": [r["loss"] and round(r["loss"], 4) for r in federated["per_round"]],
            "bytes_per_site_per_round": federated["per_round"][-1]["bytes_from_each_site"],
            "adapter_parameters": federated["adapter_parameters"], "federation_seconds": federated["seconds"],
            "per_client": federated["per_client"], "strategy": federated["strategy"], "rounds": federated["rounds"],
            "head_calibration": federated.get("head_calibration"),
            "secure_aggregation": federated.get("secure_aggregation"),
        }
    print(f"{name}: test accuracy {row['test_accuracy']:.4f} ({row['precision']}; fp32 {row['fp32_test_accuracy']:.4f}), "
          f"{seconds:.0f} s", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, help="keep builds here (default: a temporary folder)")
    parser.add_argument("--only", help=f"comma-separated federated rows to run (default: {','.join(PARTITIONS)})")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "federated.json")
    parser.add_argument("--baselines-from", type=Path, help="take the head-only and centralized rows from this earlier results file")
    options = parser.parse_args()
    partitions = options.only.split(",") if options.only else list(PARTITIONS)
    work = options.work or Path(tempfile.mkdtemp(prefix="federated-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "cache"
    target = latency_free_target(work)
    federated, uncalibrated, secure, central = configs(work, target)
    load_start, started_at = os.getloadavg(), datetime.now(timezone.utc)
    earlier = json.loads(options.baselines_from.read_text()) if options.baselines_from else None
    if earlier:
        rows = [{**row, "measured_at": earlier["started_at"]} for row in earlier["rows"] if not row["row"].startswith("federated")]
    else:
        rows = [
            run("head only", ["build", "--target", str(target), "--no-search", "--out", str(work / "head-only"), "--cache-dir", str(cache)], work),
            run("centralized LoRA", ["build", str(central), "--no-search", "--out", str(work / "central"), "--cache-dir", str(cache)], work),
        ]
    save = lambda: write_results(options.results, rows, earlier, started_at, load_start)  # noqa: E731
    save()  # after each row too: an interrupted run keeps the rows it finished ("finished_at" says when it stopped)
    runs = [(f"federated {p}", federated, p) for p in partitions]
    if "dirichlet:0.5" in partitions:
        runs.append(("federated dirichlet:0.5 without head calibration", uncalibrated, "dirichlet:0.5"))
        runs.append(("federated dirichlet:0.5 with secure aggregation", secure, "dirichlet:0.5"))
    for name, config, partition in runs:
        out = work / name.removeprefix("federated ").replace(":", "-").replace(" ", "-")
        rows.append(run(name, ["federated", "simulate", str(config), "--clients", str(CLIENTS), "--partition", partition,
                               "--out", str(out), "--cache-dir", str(cache)], work))
        save()
    print(json.dumps(json.loads(options.results.read_text())["targets"], indent=2))


def write_results(path: Path, rows: list[dict], earlier: dict | None, started_at: datetime, load_start) -> None:
    by_name = {row["row"]: row for row in rows}
    targets = {}
    if "federated dirichlet:0.5" in by_name:
        dirichlet = by_name["federated dirichlet:0.5"]
        targets = {
            "dirichlet_0.5_within_2_points_of_centralized_lora": round(100 * (by_name["centralized LoRA"]["test_accuracy"] - dirichlet["test_accuracy"]), 2),
            "dirichlet_0.5_points_above_head_only": round(100 * (dirichlet["test_accuracy"] - by_name["head only"]["test_accuracy"]), 2),
            "dirichlet_0.5_simulate_minutes": round(dirichlet["seconds"] / 60, 1),
        }
    results = {
        "benchmark": "federated_bench", "started_at": started_at.isoformat(timespec="seconds"),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": {"cpu_count": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
                 "load_average_at_start": [round(v, 2) for v in load_start], "load_average_at_end": [round(v, 2) for v in os.getloadavg()]},
        "clients": CLIENTS, "config": str(EXAMPLE.relative_to(ROOT)), "rows": rows, "targets": targets,
    }
    if earlier:
        results["earlier_federated_rows"] = {"started_at": earlier["started_at"],
                                             "rows": [row for row in earlier["rows"] if row["row"].startswith("federated")]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
