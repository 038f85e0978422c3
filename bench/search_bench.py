"""Does the build's search beat the simple alternatives on data it was not tuned for? One run, this host.

    python bench/search_bench.py --data DATA --name NAME [--budget 10] [--out bench/results/search-NAME.json]

For one labelled text set (a CSV/JSONL that ``edgekit build --data`` reads), on all-MiniLM-L6-v2:

1. **edgekit with its search**: ``edgekit build --data DATA --target x86-64-cpu --search-budget B`` from an empty
   cache, as a new user runs it (the defaults: the search is on because the data is the user's own). Recorded: the
   trials, the chosen one, the shipped bundle's test accuracy and its fp32 reference's, and the wall time.
2. **logistic regression on frozen embeddings**: mean-pooled, normalised sentence embeddings (as the model was
   trained), scikit-learn's LogisticRegression with C chosen on validation.
3. **a plain full fine-tune**: mean pooling and a linear head, AdamW at 5e-5 (encoder) and 1e-3 (head), batch 32,
   4 epochs, the epoch with the best validation accuracy kept, as one writes it by hand in 40 lines.
4. **the best hand-written example**: ``examples/wordnet-finetune.yaml``'s training (LoRA) on the same data,
   through edgekit's own passes, test accuracy of the trained PyTorch model.

Every model is scored on the same test split (edgekit's seeded split of DATA). Timings drift on shared VMs:
compare within one run. The host's load average is recorded before and after.
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
sys.path.insert(0, str(ROOT))


def _data(path: Path):
    from edgekit.config import BuildConfig, DataSection
    from edgekit.tasks import load_task_data

    return load_task_data(BuildConfig(data=DataSection(path=path, calibration_path=None)))


def edgekit_with_search(data: Path, budget: float, work: Path) -> dict:
    started = time.perf_counter()
    command = [sys.executable, "-m", "edgekit", "build", "--data", str(data), "--target", "x86-64-cpu", "--search-budget", str(budget),
               "--out", str(work / "out"), "--cache-dir", str(work / "cache"), "--json"]
    run = subprocess.run(command, capture_output=True, text=True)
    if run.returncode not in (0, 1):
        raise SystemExit(f"edgekit build failed ({run.returncode}):\n{run.stderr[-3000:]}")
    report = json.loads(run.stdout)[0]
    search = report["search"]
    chosen = next(t for t in search["trials"] if t["number"] == search["chosen"])
    return {
        "wall_s": round(time.perf_counter() - started, 1), "passed": report["passed"], "precision": report["precision"],
        "gates": {g["name"]: {"value": g["value"], "budget": g["budget"], "passed": g["passed"]} for g in report["gates"]},
        "kept_in_float": len(report["kept_in_float"]), "error": report["error"],
        "test_accuracy_bundle": report["metrics"]["final"]["accuracy"], "test_accuracy_fp32": report["metrics"]["reference"]["accuracy"],
        "test_f1_macro_bundle": report["metrics"]["final"]["f1_macro"], "search_minutes": search["spent_minutes"],
        "trials": [{k: t[k] for k in ("number", "state", "val_accuracy", "seconds", "params", "note")} for t in search["trials"]],
        "chosen": {"number": chosen["number"], "params": chosen["params"], "val_accuracy": chosen["val_accuracy"]},
        "passes_s": {p["name"]: p["seconds"] for p in report["passes"]},
    }


def _encoder():
    from transformers import AutoModel

    from edgekit.passes.load import resolve_source

    folder = resolve_source("embedded:all-minilm-l6-v2")
    return folder, AutoModel.from_pretrained(folder)


def _mean_pooled(encoder, tokenizer, texts, grad=False):
    import torch

    inputs = {k: torch.from_numpy(v) for k, v in tokenizer.encode(list(texts)).items()}
    with torch.set_grad_enabled(grad):
        hidden = encoder(**inputs).last_hidden_state
    mask = inputs["attention_mask"].unsqueeze(-1).float()
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def logistic_regression(data) -> dict:
    import torch
    from sklearn.linear_model import LogisticRegression

    from device_agent.preprocess import TextTokenizer

    folder, encoder = _encoder()
    tokenizer = TextTokenizer(folder / "tokenizer.json", 128)
    encoder.eval()

    def embed(split):
        with torch.inference_mode():
            rows = [torch.nn.functional.normalize(_mean_pooled(encoder, tokenizer, split.texts[i:i + 64]), dim=-1)
                    for i in range(0, len(split), 64)]
        return torch.cat(rows).numpy()

    started = time.perf_counter()
    train, val, test = embed(data.train), embed(data.val), embed(data.test)
    best = max(((c, LogisticRegression(C=c, max_iter=3000).fit(train, data.train.labels)) for c in (0.3, 1, 3, 10, 30)),
               key=lambda pair: pair[1].score(val, data.val.labels))
    return {"C": best[0], "val_accuracy": float(best[1].score(val, data.val.labels)),
            "test_accuracy": float(best[1].score(test, data.test.labels)), "seconds": round(time.perf_counter() - started, 1)}


def plain_full_finetune(data, epochs: int = 4) -> dict:
    import torch

    from device_agent.preprocess import TextTokenizer

    torch.manual_seed(0)
    folder, encoder = _encoder()
    tokenizer = TextTokenizer(folder / "tokenizer.json", 128)
    head = torch.nn.Linear(encoder.config.hidden_size, len(data.labels))
    optimizer = torch.optim.AdamW([{"params": encoder.parameters(), "lr": 5e-5}, {"params": head.parameters(), "lr": 1e-3}])

    def accuracy(split) -> float:
        encoder.eval()
        with torch.inference_mode():
            predicted = [head(_mean_pooled(encoder, tokenizer, split.texts[i:i + 64])).argmax(-1) for i in range(0, len(split), 64)]
        return float((torch.cat(predicted).numpy() == split.labels).mean())

    started, best = time.perf_counter(), (-1.0, 0, 0.0)
    for epoch in range(1, epochs + 1):
        encoder.train()
        order = torch.randperm(len(data.train)).numpy()
        for start in range(0, len(order), 32):
            rows = order[start:start + 32]
            logits = head(_mean_pooled(encoder, tokenizer, [data.train.texts[i] for i in rows], grad=True))
            loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(data.train.labels[rows]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        val = accuracy(data.val)
        if val > best[0]:
            best = (val, epoch, accuracy(data.test))
    return {"epochs": epochs, "best_epoch": best[1], "val_accuracy": best[0], "test_accuracy": best[2],
            "seconds": round(time.perf_counter() - started, 1)}


def hand_written_example(data_path: Path, data, work: Path) -> dict:
    """examples/wordnet-finetune.yaml's training on this data, through edgekit's passes; the torch model on test."""
    from rich.progress import Progress

    from edgekit import training
    from edgekit.config import load_build_config
    from edgekit.measure import classification_metrics
    from edgekit.pipeline import Build
    from edgekit.tasks import task_for

    from device_agent.keys import generate_keypair

    example = ROOT / "examples" / "wordnet-finetune.yaml"
    config = load_build_config(example)
    config = config.model_copy(update={"data": config.data.model_copy(update={"path": data_path, "calibration_path": None})})
    generate_keypair(work / "key")
    started = time.perf_counter()
    artifact = Build(config, data, work / "out", work / "cache", work / "key" / "edgekit.key", Progress(disable=True), print).train()
    task = task_for(config.task.kind)
    logits = training.predict(task.load_torch(artifact.directory), task.torch_batches(artifact.task, data.test), task.forward)
    test = classification_metrics(data.test.labels, logits.argmax(-1), data.labels)
    return {"config": str(example.relative_to(ROOT)), "finetune": config.finetune.model_dump(include={"method", "epochs", "learning_rate", "lora_r"}),
            "val_accuracy": artifact.results.finetune.val_accuracy, "test_accuracy": test.accuracy,
            "seconds": round(time.perf_counter() - started, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--budget", type=float, default=10.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    out = args.out or ROOT / "bench" / "results" / f"search-{args.name}.json"
    data = _data(args.data)
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "data": str(args.data), "name": args.name,
              "rows": {"train": len(data.train), "val": len(data.val), "test": len(data.test)}, "classes": len(data.labels),
              "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
                       "load_average_before": os.getloadavg()}}
    with tempfile.TemporaryDirectory() as scratch:
        for name, measure in (("logistic_regression_frozen", lambda: logistic_regression(data)),
                              ("hand_written_example", lambda: hand_written_example(args.data, data, Path(scratch) / "example")),
                              ("edgekit_search", lambda: edgekit_with_search(args.data, args.budget, Path(scratch) / "search")),
                              ("plain_full_finetune", lambda: plain_full_finetune(data))):
            print(f"{name} ...", file=sys.stderr, flush=True)
            result[name] = measure()
            print(json.dumps(result[name])[:600], file=sys.stderr, flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    search = result["edgekit_search"]["test_accuracy_bundle"]
    result["points_over"] = {name: round(100 * (search - result[name]["test_accuracy"]), 2)
                             for name in ("logistic_regression_frozen", "plain_full_finetune", "hand_written_example")}
    result["host"]["load_average_after"] = os.getloadavg()
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps(result["points_over"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
