"""Pruning benchmark: the demo classifier with heads + FFN neurons pruned at 3 ratios, with recovery, in one run.

The model is the embedded demo: all-MiniLM-L6-v2 with the head the load pass
fits on WordNet glosses (8 supersense classes), sequence 128 as the build uses.

Steps:
1. The load pass (head fit) gives the unpruned model.
2. For each ratio the prune pass runs as a build runs it (Taylor ranking on 256
   train rows, heads across layers, FFN neurons evenly per layer, recovery
   fine-tuning with distillation from the unpruned logits, capped at
   ``--recovery-steps``).
3. Control: the unpruned model gets the same recovery training, so the table
   separates what pruning costs from what the extra training gains.
4. Every model is exported to fp32 ONNX as the export pass exports it and, as
   the build's optimize pass does for ONNX Runtime targets, with ONNX Runtime's
   transformer fusions. A child process without torch (torch's idle OpenMP
   threads steal the cores otherwise) measures p50 latency at batch 1 (one test
   text padded to 128 tokens) of all models in alternating rounds
   (``measure.latency_rounds``), and accuracy on the 800-row test split.

Run: python bench/prune_bench.py [--ratios 0.2 0.3 0.5] [--recovery-steps 200] [--out bench/results/prune.json] [--keep DIR]
Timing on shared VMs drifts: compare numbers only within one run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SEQUENCE = 128


def _context(work: Path, data, config):
    from rich.progress import Progress

    from edgekit.artifact import PassContext

    work.mkdir(parents=True, exist_ok=True)
    return PassContext(work, data, Progress(disable=True), work / "unused.key", lambda line: print(line, flush=True))


def prepare(work: Path, ratios: list[float], recovery: dict, control: bool) -> dict:
    """Load, prune at each ratio, train the control; export every model to ONNX. Returns what was done."""
    import torch

    from edgekit.artifact import Artifact, Stage, TaskSpec
    from edgekit.config import BuildConfig, PruneSection
    from edgekit.passes import load, prune
    from edgekit.pruning import encoder, parameter_count
    from edgekit.tasks.text_classification import load_task_data

    # One torch thread: on 2 cores shared with other processes, 2 spinning OpenMP threads were up to 15x slower.
    torch.set_num_threads(1)
    config = BuildConfig()
    data = load_task_data(config.data)
    started = time.perf_counter()
    source = Artifact(Stage.SOURCE, Path(config.model.source), "", "demo", TaskSpec("text-classification", data.labels, SEQUENCE, None))
    base = load.run(source, load.options_for(config, None), _context(work / "load", data, config))
    record = {"load_seconds": time.perf_counter() - started, "load": base.results.load.model_dump(exclude_unset=True), "models": {}}
    models = {"unpruned": base.directory}

    for ratio in ratios:
        settings = PruneSection(enabled=True, ratio=ratio, **recovery)
        pruned_config = config.model_copy(update={"prune": settings})
        started = time.perf_counter()
        result = prune.run(base, prune.options_for(pruned_config, None), _context(work / f"prune-{ratio}", data, pruned_config))
        metrics = result.results.prune.model_dump(exclude_unset=True)
        metrics["pass_seconds"] = time.perf_counter() - started
        record["models"][f"pruned {ratio:.0%}"] = metrics
        models[f"pruned {ratio:.0%}"] = result.directory

    from transformers import AutoModelForSequenceClassification

    if control:  # the same recovery training without pruning (the teacher is the model itself)
        started = time.perf_counter()
        model = AutoModelForSequenceClassification.from_pretrained(base.directory)
        settings = PruneSection(enabled=True, **recovery)
        teacher = encoder.teacher_logits(model, base.task, data.train, settings)
        trained = encoder.recover(model, teacher, base.task, data.train, settings, _context(work / "control", data, config))
        record["models"]["unpruned + same training"] = {"recovery": trained, "seconds": time.perf_counter() - started,
                                                        "val_accuracy": encoder._accuracy(model, base.task, data.val)}
        model.save_pretrained(work / "control")
        models["unpruned + same training"] = work / "control"

    onnx_dir = work / "onnx"
    onnx_dir.mkdir()
    files = {}
    for index, (name, folder) in enumerate(models.items()):
        model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        record["models"].setdefault(name, {})["parameters"] = parameter_count(model)
        record["models"][name]["shape"] = encoder.encoder_shape(model)
        plain = encoder.export_encoder(model, base.directory, onnx_dir / f"{index}.onnx")
        fused = _fuse(plain, onnx_dir / f"{index}-fused.onnx")
        files[name] = {"plain": str(plain), "fused": str(fused)}
    record["onnx"] = files
    return record


def _fuse(path: Path, out: Path) -> Path:
    """ONNX Runtime's transformer fusions, as the optimize pass applies them (num_heads detected per attention)."""
    import logging

    from onnxruntime.transformers.optimizer import optimize_model

    logging.getLogger("onnxruntime").setLevel(logging.ERROR)
    optimize_model(str(path), model_type="bert", num_heads=0, hidden_size=0, opt_level=0).save_model_to_file(str(out))
    return out


def measure(spec_path: Path) -> None:
    """Child process (no torch): test accuracy and alternating-round latency of every ONNX model."""
    import numpy as np

    from device_agent.preprocess import TextTokenizer
    from edgekit.config import BuildConfig
    from edgekit.measure import classification_metrics, latency_rounds, size_mb
    from edgekit.pruning import ort_session
    from edgekit.tasks.text_classification import load_task_data

    spec = json.loads(spec_path.read_text())
    data = load_task_data(BuildConfig().data)
    tokenizer = TextTokenizer(Path(spec["tokenizer"]), SEQUENCE)
    padded = TextTokenizer(Path(spec["tokenizer"]), SEQUENCE, pad_to_max_length=True).encode(data.test.texts[:1])
    batches = [tokenizer.encode(data.test.texts[i:i + 32]) for i in range(0, len(data.test), 32)]
    results, calls = {}, {}
    for name, variants in spec["onnx"].items():
        for variant, path in variants.items():
            session = ort_session(Path(path))
            names = {i.name for i in session.get_inputs()}
            logits = np.concatenate([session.run(None, {k: v for k, v in b.items() if k in names})[0] for b in batches])
            accuracy = classification_metrics(data.test.labels, logits.argmax(-1), data.labels).accuracy
            results[f"{name} | {variant}"] = {"test_accuracy": accuracy, "size_mb": size_mb(Path(path))}
            feeds = {k: v for k, v in padded.items() if k in names}
            calls[f"{name} | {variant}"] = (lambda s=session, f=feeds: s.run(None, f))
    timing = latency_rounds(calls, rounds=spec["rounds"], iterations=spec["iterations"])
    for key, value in timing.items():
        results[key].update(latency_p50_ms=value.p50_ms, latency_p95_ms=value.p95_ms, samples=value.samples)
    print(json.dumps(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.3, 0.5])
    parser.add_argument("--recovery-steps", type=int, default=200)
    parser.add_argument("--recovery-batch-size", type=int, default=32)
    parser.add_argument("--recovery-lr", type=float, default=5e-5)
    parser.add_argument("--no-control", action="store_true", help="skip the unpruned model trained like the recovery")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "prune.json")
    parser.add_argument("--keep", type=Path, help="keep the models here")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args.measure)
        return
    started = time.perf_counter()
    work = args.keep or Path(tempfile.mkdtemp(prefix="prune-bench-"))
    try:
        recovery = {"recovery_steps": args.recovery_steps, "recovery_batch_size": args.recovery_batch_size,
                    "recovery_learning_rate": args.recovery_lr}
        record = prepare(work, args.ratios, recovery, not args.no_control)
        prepared = time.perf_counter() - started
        spec = {"onnx": record["onnx"], "tokenizer": str(work / "load" / "tokenizer.json"), "rounds": args.rounds, "iterations": args.iterations}
        (work / "measure.json").write_text(json.dumps(spec))
        child = subprocess.run([sys.executable, __file__, "--measure", str(work / "measure.json")], capture_output=True, text=True, check=False)
        if child.returncode:
            raise SystemExit(f"measuring child failed:\n{child.stderr[-4000:]}")
        measured = json.loads(child.stdout.strip().splitlines()[-1])
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    import onnxruntime
    import torch
    import transformers

    record.pop("onnx")
    baseline = measured["unpruned | plain"]
    for key, value in measured.items():
        name, variant = key.split(" | ")
        reference = measured[f"unpruned | {variant}"]
        value["speedup_vs_unpruned"] = reference["latency_p50_ms"] / value["latency_p50_ms"]
        value["accuracy_drop_points"] = (baseline["test_accuracy"] - value["test_accuracy"]) * 100
    report = {
        "date": datetime.date.today().isoformat(), "host": platform.processor() or platform.machine(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "onnxruntime": onnxruntime.__version__},
        "sequence": SEQUENCE, "ratios": args.ratios, "recovery_steps": args.recovery_steps,
        "recovery_batch_size": args.recovery_batch_size, "recovery_learning_rate": args.recovery_lr,
        "rounds": args.rounds, "iterations": args.iterations, "prepare_seconds": prepared,
        "total_seconds": time.perf_counter() - started, "measured": measured, **record,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\n{'model':<28} {'variant':<6} {'p50 ms':>8} {'speedup':>8} {'test acc':>9} {'drop pt':>8} {'MB':>7}")
    for key, value in measured.items():
        name, variant = key.split(" | ")
        print(f"{name:<28} {variant:<6} {value['latency_p50_ms']:8.2f} {value['speedup_vs_unpruned']:7.2f}x "
              f"{value['test_accuracy']:9.4f} {value['accuracy_drop_points']:8.2f} {value['size_mb']:7.1f}")
    print(f"written {args.out} ({report['total_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
