"""Faithfulness of explanations: deletion curves against random deletion, on the demo and on Fashion-MNIST.

    python bench/explain_bench.py                  # builds both for x86-64-cpu (about 15 minutes on 2 cores), writes bench/results/explain.json
    python bench/explain_bench.py --work /tmp/eb   # keep the builds there; a rerun with the same folder builds nothing

An attribution is faithful when what it ranks first matters to the model: deleting the k top-attributed words (or
patches) should lower the predicted class's probability more than deleting k random ones. For each test input
(the first rows of the test split, which is stored in a stratified order) this explains the prediction of the signed
x86-64-cpu bundle (built with the shipped profile less its latency budget) with occlusion (``device_agent.explain``, ONNX Runtime: what a device runs), then measures with the
same bundle (``device_agent.explain.deletion_drop``) the probability drop of deleting

- the demo (all-MiniLM-L6-v2, head on WordNet glosses): the top k = 1, 2, 3 words against k random words read by the
  model, over texts with more than k words read (deleting every word would make both the same);
- Fashion-MNIST (``examples/fashion-mnist.yaml``): the top k = 1..5 cells of the patch-side grid (4x4 pixels of 28x28,
  painted with the training mean) against k random cells.

The same curves for Integrated Gradients (``edgekit.gradients``, Captum on the fp32 parent), ranked by IG and measured
on the bundle, for the inputs where the bundle and its fp32 parent predict the same class. Each mean comes with a 95%
bootstrap interval; "top - random" is the mean of the paired differences. Cost: model rows and milliseconds per
explanation. Numbers are reported, not asserted.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGET = "x86-64-cpu"
FASHION_CONFIG = ROOT / "examples" / "fashion-mnist.yaml"
TEXT_KS = (1, 2, 3)
IMAGE_KS = (1, 2, 3, 4, 5)
RESAMPLES = 10_000  # bootstrap resamples per interval


def latency_free_target(work: Path) -> Path:
    """The shipped x86-64-cpu profile without its latency budget: this measures explanations, and a latency gate
    failed on a busy shared VM would leave no bundle to explain."""
    import yaml

    document = yaml.safe_load((ROOT / "targets" / f"{TARGET}.yaml").read_text())
    document["budgets"]["p95_latency_ms"] = 10_000
    path = work / f"{TARGET}.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def build(config: Path | None, out: Path, cache: Path, target: Path) -> float | None:
    """Build for ``target`` unless ``out`` holds a bundle already; the wall time in seconds (None when reused)."""
    if list((out / TARGET).glob("*.ekb")):
        return None
    started = time.perf_counter()
    command = [sys.executable, "-m", "edgekit", "build", *([str(config)] if config else []), "--target", str(target),
               "--out", str(out), "--cache-dir", str(cache), "--no-search"]
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def interval(values: list[float], rng: np.random.Generator) -> dict:
    """The mean with its 95% bootstrap percentile interval."""
    array = np.asarray(values, dtype=np.float64)
    means = array[rng.integers(0, len(array), size=(RESAMPLES, len(array)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"mean": round(float(array.mean()), 4), "ci95": [round(float(low), 4), round(float(high), 4)]}


def curves(drops: dict[int, list[tuple[float, float]]], rng: np.random.Generator) -> dict:
    """Per k: the mean drop of deleting the top-k and k random pieces, and their paired difference."""
    return {str(k): {"inputs": len(pairs), "top": interval([t for t, _ in pairs], rng),
                     "random": interval([r for _, r in pairs], rng),
                     "top_minus_random": interval([t - r for t, r in pairs], rng)}
            for k, pairs in drops.items() if pairs}


def cost(explanations: list) -> dict:
    rows = [e.rows_run for e in explanations]
    milliseconds = [e.milliseconds for e in explanations]
    return {"explanations": len(explanations), "rows_mean": round(float(np.mean(rows)), 1),
            "ms_median": round(float(np.median(milliseconds)), 2), "ms_mean": round(float(np.mean(milliseconds)), 2)}


def faithfulness(model, items, explain_one, ks: tuple[int, ...], pieces_of, rng: np.random.Generator,
                 *, from_parent: bool = False) -> tuple[dict, dict]:
    """Deletion drops of the explanations ``explain_one`` gives, and their cost. Every explanation is made before any
    deletion is run: torch's idle OpenMP threads spin for a while after each use and would slow ONNX Runtime's runs
    (and the other way round) if the two alternated. ``from_parent``: the explanations are of the fp32 parent."""
    from device_agent.explain import deletion_drop

    explained = [(item, explain_one(item)) for item in items]
    spent = cost([explanation for _, explanation in explained])
    if from_parent:
        explained = [(item, on_the_bundle(model, explanation, item)) for item, explanation in explained]
    drops: dict[int, list[tuple[float, float]]] = {k: [] for k in ks}
    for item, explanation in explained:
        if explanation is None:
            continue
        for k in ks:
            if pieces_of(explanation) > k:
                drops[k].append(deletion_drop(model, item, explanation, k, rng))
    return curves(drops, rng), spent


def on_the_bundle(model, explanation, item):
    """An fp32 explanation measured on the bundle: its probability is the bundle's (the drop is the bundle's); None
    where the bundle predicts another class."""
    from device_agent.classifier import softmax

    probabilities = softmax(model.logits([item] if isinstance(item, str) else item[None]))[0]
    if int(np.argmax(probabilities)) != explanation.class_index:
        return None
    return replace(explanation, probability=float(probabilities[explanation.class_index]))


def measure(out: Path, keyring_dir: Path, test, count: int, ks: tuple[int, ...], rng: np.random.Generator) -> dict:
    from device_agent.bundle import open_bundle
    from device_agent.classifier import classifier_of_bundle
    from device_agent.explain import explain, grid_cells, patch_side
    from device_agent.keys import Keyring
    from edgekit.gradients import GradientExplainer, parent_model

    (bundle,) = sorted((out / TARGET).glob("*.ekb"))
    items = list(test.inputs[:count])
    with open_bundle(bundle, Keyring.load(keyring_dir)) as opened:
        model = classifier_of_bundle(opened)
        if model.input_kind == "text":
            def pieces_of(explanation):
                return sum(piece.read for piece in explanation.pieces)
        else:
            def pieces_of(explanation):
                return len(grid_cells(*explanation.pixels.shape[:2], explanation.patch))
        occlusion, occlusion_cost = faithfulness(model, items, lambda item: explain(model, item), ks, pieces_of, rng)
        gradients = GradientExplainer(parent_model(out))
        ig = gradients.text if model.input_kind == "text" else gradients.image
        integrated, integrated_cost = faithfulness(model, items, lambda item: ig(item).explanation, ks, pieces_of, rng,
                                                   from_parent=True)
        report = json.loads((out / TARGET / "report.json").read_text())
        if model.input_kind == "text":
            pieces = "words read by the model"
        else:
            height, width = opened.manifest.preprocessing.crop
            side = patch_side(height, width)
            pieces = f"{side}x{side}-pixel cells of the {height}x{width} image ({len(grid_cells(height, width, side))} cells)"
        return {"bundle": bundle.name, "precision": opened.manifest.precision, "test_rows_used": len(items),
                "test_accuracy": report["metrics"]["final"]["accuracy"], "k_counts": pieces,
                "occlusion": {"deletion": occlusion, "cost": occlusion_cost},
                "integrated_gradients": {"deletion": integrated, "cost": integrated_cost,
                                         "note": "ranked on the fp32 parent, measured on the bundle; inputs where the "
                                                 "bundle predicts another class are left out"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="where the builds and their pass cache go (default: a new temporary folder)")
    parser.add_argument("--texts", type=int, default=200, help="demo test texts explained")
    parser.add_argument("--images", type=int, default=100, help="Fashion-MNIST test images explained")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "explain.json")
    args = parser.parse_args()

    from edgekit.config import BuildConfig, load_build_config
    from edgekit.tasks import load_task_data

    work = args.work or Path(tempfile.mkdtemp(prefix="explain-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    cache, target = work / "cache", latency_free_target(work)
    result: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(),
                 "load_average_start": [round(v, 2) for v in os.getloadavg()]},
        "versions": {name: importlib.metadata.version(name) for name in ("onnxruntime", "torch", "captum")},
        "method": "occlusion explains the bundle's prediction; deletion removes the top-k (or k random) pieces and "
                  "measures the bundle's drop of that class's probability; 95% bootstrap intervals",
        "build_seconds": {},
    }
    sets = (("demo", None, args.texts, TEXT_KS), ("fashion-mnist", FASHION_CONFIG, args.images, IMAGE_KS))
    for name, config, count, ks in sets:
        out = work / name
        seconds = build(config, out, cache, target)
        result["build_seconds"][name] = round(seconds, 1) if seconds is not None else "reused"
        data = load_task_data(load_build_config(config) if config else BuildConfig())
        print(f"{name}: explaining {count} test inputs", flush=True)
        result[name] = measure(out, cache / "dev-key", data.test, count, ks, np.random.default_rng(0))
    result["host"]["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
