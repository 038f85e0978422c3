"""Drift monitor benchmark: false alarms on unshifted windows, detection delay for known shifts, per-request cost.

    edgekit build examples/fashion-mnist.yaml --out /tmp/fm-out --target x86-64-cpu   # ~7 min
    edgekit build --out /tmp/demo-out                                                 # the embedded text demo, ~2 min
    python bench/drift_bench.py [--fashion-mnist-build /tmp/fm-out] [--demo-build /tmp/demo-out] [--out bench/results/drift.json]

Both parts use the build's final model (the compile pass's output, the model the bundle carries, whether or not the
host's latency gate let the bundle be written) and a reference made by ``edgekit.drift_reference.reference_from_splits``,
the call the package pass makes. Every row passes through ``device_agent.features`` and ``DriftMonitor.observe`` one
request (one row) at a time, as on the device. A shifted stream starts at the first row of a fresh monitor, so its
"first drifting window" is the detection delay in windows of ``WINDOW`` rows (1: the first shifted window drifts);
an alert needs ``consecutive_for_alert`` (2) drifting windows in a row.

Fashion-MNIST (the example's IDX files, split by the build's own loader): the validation (6,000 training images held
out from training) and test (10,000) images are pooled and split at random: 5,000 for the reference, 11,000 for the
stream, so the unshifted stream is a new sample of the same population. (a) unshifted, (b) brightness/contrast shifts of the
raw pixels, (c) class-prior shifts.

Demo text: the reference is the bundle's own, from the demo set's validation and test splits (1,200 glosses). The
demo set keeps 500 glosses per supersense from WordNet's data.noun; (d) streams glosses of the same 8 supersenses that
are *not* in the demo set (read with calibration/make_wordnet_demo.py's parser), drawn with every supersense equally
likely as in the demo set; (e) mixes in glosses of held-out supersenses (noun.act, noun.communication,
noun.cognition) at 10%, 20% and 30% of the rows.

Per-request cost: what the agent adds to one request (features from the model's inputs and logits, then counting),
timed three times; the median and the machine's load average are reported.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from device_agent import features as F
from device_agent.drift import DriftMonitor, MonitorSettings
from device_agent.telemetry_schema import DriftReference

WINDOW = 500
UNSHIFTED_WINDOWS = 1000  # the issue asks for at least 200; more narrows the estimate of a ~1% rate
SHIFT_WINDOWS = 10
REPEATS = 3
ROOT = Path(__file__).resolve().parent.parent
FRESH_PER_CLASS = 1000  # fresh glosses per demo supersense (the smallest, noun.body, has 1,512 outside the demo set)
HELD_OUT_SUPERSENSES = ("act", "communication", "cognition")
HELD_OUT_ROWS = 3000
# Of the 16,000 Fashion-MNIST images the model never trained on: the rest is the stream. The stream is itself a finite
# sample whose deviation from the population repeats in every window; the larger it is against the reference, the
# closer the measured rate comes to that of an endless stream.
FASHION_REFERENCE_ROWS = 5000


# --------------------------------------------------------------------------- shared helpers


def _final_model(build: Path):
    """The compile pass's model and task: the model the bundle carries."""
    from device_agent.bundle import ImagePreprocessing
    from edgekit.artifact import TaskSpec

    passes = build / "x86-64-cpu" / "passes"
    for folder in sorted(passes.iterdir(), reverse=True):
        record = folder / "artifact.json"
        if record.is_file() and json.loads(record.read_text())["stage"] == "engine":
            artifact = json.loads(record.read_text())
            task = dict(artifact["task"])
            task["labels"] = tuple(task["labels"])
            task["input_names"] = tuple(task["input_names"])
            task["tokenizer_file"] = Path(task["tokenizer_file"]) if task["tokenizer_file"] else None
            task["image"] = ImagePreprocessing.model_validate(task["image"]) if task["image"] else None
            return folder / artifact["model_file"], TaskSpec(**task)
    raise SystemExit(f"no compile pass output under {passes}; build first (see the docstring)")


def _windows(reference: DriftReference, features: dict[str, np.ndarray], rows: np.ndarray) -> list[dict]:
    """Feed ``rows`` (indices into the per-row features) one request at a time; the closed windows."""
    monitor = DriftMonitor(reference, None, MonitorSettings(window_size=WINDOW, window_seconds=1e12))
    closed = []
    for row in rows:
        window = monitor.observe({name: values[row:row + 1] for name, values in features.items()}, 1, 1.0)
        if window is not None:
            closed.append(window)
    return closed


def _summary(windows: list[dict]) -> dict:
    drifting = [w["drifting"] for w in windows]
    alerts = [w["alert"] for w in windows]
    first = next((i + 1 for i, d in enumerate(drifting) if d), None)
    first_alert = next((i + 1 for i, a in enumerate(alerts) if a), None)
    blamed: dict[str, int] = {}
    for window in windows:
        for name in window["top_features"][:1]:
            blamed[name] = blamed.get(name, 0) + 1
    return {"windows": len(windows), "drifting_windows": sum(drifting), "rate": round(sum(drifting) / len(windows), 4),
            "alert_windows": sum(alerts), "first_drifting_window": first, "first_alert_window": first_alert,
            "top_features_of_first_drifting": windows[first - 1]["top_features"][:3] if first else [],
            "most_drifting_feature_counts": dict(sorted(blamed.items(), key=lambda kv: -kv[1]))}


def _mixed_rows(rng: np.random.Generator, share: float, base: np.ndarray, other: np.ndarray, count: int) -> np.ndarray:
    """``count`` row indices: each from ``other`` with probability ``share``, else from ``base``."""
    return np.where(rng.random(count) < share, rng.choice(other, count), rng.choice(base, count))


def _timed(call, calls: int) -> float:
    """Microseconds per call of ``call()``, over ``calls`` calls after a warm-up."""
    for _ in range(min(200, calls)):
        call()
    started = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - started) / calls * 1e6


def _repeated(call, calls: int) -> dict:
    runs = [_timed(call, calls) for _ in range(REPEATS)]
    return {"median_us": round(statistics.median(runs), 2), "runs_us": [round(r, 2) for r in runs]}


def _per_request(reference: DriftReference, session, feeds: dict, request_features, calls: int) -> dict:
    """Median cost of the monitor per one-row request, against the model's own inference at batch 1."""
    monitor = DriftMonitor(reference, None, MonitorSettings(window_size=10**9, window_seconds=1e12))
    found = request_features()

    def features_and_counting() -> None:
        monitor.observe(request_features(), 1, 1.0)

    load_before = os.getloadavg()
    result = {
        "features_and_counting": _repeated(features_and_counting, 20000),
        "counting_only": _repeated(lambda: monitor.observe(found, 1, 1.0), 20000),
        "model_inference": _repeated(lambda: session.run(None, feeds), 300),
    }
    result["share_of_inference"] = round(result["features_and_counting"]["median_us"] / result["model_inference"]["median_us"], 4)
    result["load_average_1_5_15min"] = {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in os.getloadavg()]}
    return result


# --------------------------------------------------------------------------- Fashion-MNIST


def fashion_mnist(build: Path, rng: np.random.Generator) -> dict:
    import onnxruntime

    from device_agent.preprocess import ImagePreprocessor
    from edgekit.config import load_build_config
    from edgekit.data import Split
    from edgekit.drift_reference import model_features, reference_from_splits
    from edgekit.tasks import load_task_data

    model, task = _final_model(build)
    data = load_task_data(load_build_config(ROOT / "examples" / "fashion-mnist.yaml"))
    images = np.concatenate([data.val.inputs, data.test.inputs])
    labels = np.concatenate([data.val.labels, data.test.labels])
    order = rng.permutation(len(images))
    reference_rows, stream_rows = np.sort(order[:FASHION_REFERENCE_ROWS]), np.sort(order[FASHION_REFERENCE_ROWS:])
    started = time.perf_counter()
    reference = reference_from_splits(model, task, [Split(images[reference_rows], labels[reference_rows])], window_size=WINDOW)
    build_s = time.perf_counter() - started
    preprocess = ImagePreprocessor(task.image)
    stream_x, stream_y = images[stream_rows], labels[stream_rows]

    def features(raw: np.ndarray) -> dict[str, np.ndarray]:
        return model_features(model, raw, image_preprocess=preprocess, output_name=task.output_name, batch_size=256)

    stream = features(stream_x)
    every = np.arange(len(stream_x))
    results = {
        "model": f"{model} (int8 static QDQ, the example's compile pass output)",
        "reference": "reference_from_splits on 5,000 random images of the validation + test splits; the stream: the other 11,000",
        "reference_rows": len(reference_rows), "stream_rows": len(stream_rows), "reference_build_s": round(build_s, 2),
        "stream_accuracy": round(float((stream["output.predicted_class"] == stream_y).mean()), 4),
        "thresholds": {name: {"psi": round(f.thresholds.psi, 4), "js": round(f.thresholds.js, 4), "bins": f.bins}
                       for name, f in reference.features.items()},
    }
    results["a_unshifted"] = _summary(_windows(reference, stream, rng.choice(every, UNSHIFTED_WINDOWS * WINDOW)))
    count = SHIFT_WINDOWS * WINDOW
    for key, label, shifted in (
        ("b_brightness_contrast", "pixel * 0.9 + 20", lambda x: x.astype(np.float32) * 0.9 + 20),
        ("b_brightness_mild", "pixel + 8", lambda x: x.astype(np.float32) + 8),
        ("b_contrast_only", "(pixel - 128) * 0.85 + 128", lambda x: (x.astype(np.float32) - 128) * 0.85 + 128),
    ):
        moved = features(np.clip(np.rint(shifted(stream_x)), 0, 255).astype(np.uint8))
        results[key] = {"shift": label, "stream_accuracy": round(float((moved["output.predicted_class"] == stream_y).mean()), 4),
                        **_summary(_windows(reference, moved, rng.choice(every, count)))}
    favoured = np.flatnonzero(stream_y <= 1)
    for key, share in (("c_class_prior_50pct", 0.5), ("c_class_prior_20pct", 0.2)):
        results[key] = {"shift": f"{int(share * 100)}% of rows from classes 0-1 (T-shirt/top, trouser), the rest as before",
                        **_summary(_windows(reference, stream, _mixed_rows(rng, share, every, favoured, count)))}

    session = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    one = stream_x[:1]
    feeds = {session.get_inputs()[0].name: preprocess(one)}
    (logits,) = session.run([task.output_name], feeds)

    def request_features() -> dict[str, np.ndarray]:
        found = F.image_features(one)
        found.update(F.output_features(logits))
        return found

    results["per_request"] = _per_request(reference, session, feeds, request_features, 20000)
    return results


# --------------------------------------------------------------------------- demo text


def _wordnet_demo_module():
    spec = importlib.util.spec_from_file_location("make_wordnet_demo", ROOT / "calibration" / "make_wordnet_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fresh_glosses(rng: np.random.Generator) -> tuple[dict[str, list[str]], list[str]]:
    """Glosses outside the demo set: up to FRESH_PER_CLASS per demo supersense, and HELD_OUT_ROWS of held-out ones.

    The same parser and filters as the demo set (make_wordnet_demo: definition part of the gloss, at least MIN_WORDS
    words, texts shared by synsets of different supersenses dropped).
    """
    demo = _wordnet_demo_module()
    _, synsets = demo.read_data_noun(demo.DEFAULT_WORDNET_DIR / "data.noun")
    in_demo = {json.loads(line)["text"] for line in (ROOT / "calibration" / "wordnet-supersenses" / "data.jsonl").open()}
    labels_of: dict[str, set[str]] = {}
    for synset in synsets:
        labels_of.setdefault(synset["text"], set()).add(synset["label"])
    usable = sorted({(s["label"], s["text"]) for s in synsets
                     if len(s["text"].split()) >= demo.MIN_WORDS and s["text"] not in in_demo and len(labels_of[s["text"]]) == 1})
    fresh = {}
    for label in demo.CLASSES:
        pool = [text for name, text in usable if name == label]
        fresh[label] = [pool[i] for i in sorted(rng.choice(len(pool), min(FRESH_PER_CLASS, len(pool)), replace=False))]
    held = [text for name, text in usable if name in HELD_OUT_SUPERSENSES]
    return fresh, [held[i] for i in sorted(rng.choice(len(held), HELD_OUT_ROWS, replace=False))]


def demo_text(build: Path, rng: np.random.Generator) -> dict:
    import onnxruntime

    from device_agent.preprocess import TextTokenizer
    from edgekit.config import BuildConfig
    from edgekit.drift_reference import model_features, reference_from_splits
    from edgekit.tasks import load_task_data

    model, task = _final_model(build)
    data = load_task_data(BuildConfig())
    started = time.perf_counter()
    reference = reference_from_splits(model, task, (data.val, data.test), window_size=WINDOW)
    build_s = time.perf_counter() - started
    fresh, held = fresh_glosses(rng)
    kwargs = {"tokenizer_file": task.tokenizer_file, "max_length": task.max_length, "output_name": task.output_name}
    texts = [text for label in sorted(fresh) for text in fresh[label]]
    truth = np.array([task.labels.index(label) for label in sorted(fresh) for _ in fresh[label]])
    # One text per model run, as the device serves them: the int8 model's activations are quantized per run
    # (dynamic quantization), so a row's outputs shift a little with the rows batched and padded beside it.
    stream = model_features(model, texts + held, batch_size=1, **kwargs)
    fresh_rows = {label: np.flatnonzero(truth == task.labels.index(label)) for label in fresh}

    def balanced(count: int) -> np.ndarray:
        """Rows with every supersense equally likely, as in the demo set (500 glosses each)."""
        classes = rng.integers(0, len(fresh_rows), count)
        pools = list(fresh_rows.values())
        return np.array([pools[c][rng.integers(0, len(pools[c]))] for c in classes])

    results = {
        "model": f"{model} (the demo's final int8 model)",
        "reference": "reference_from_splits on the demo set's validation + test splits (what the bundle carries)",
        "reference_rows": reference.reference_rows, "reference_build_s": round(build_s, 2),
        "fresh_glosses_per_supersense": {label: len(rows) for label, rows in fresh_rows.items()},
        "fresh_accuracy": round(float((stream["output.predicted_class"][: len(texts)] == truth).mean()), 4),
        "held_out_supersenses": [f"noun.{name}" for name in HELD_OUT_SUPERSENSES], "held_out_rows": len(held),
        "thresholds": {name: {"psi": round(f.thresholds.psi, 4), "js": round(f.thresholds.js, 4), "bins": f.bins}
                       for name, f in reference.features.items()},
    }
    results["d_unshifted"] = _summary(_windows(reference, stream, balanced(UNSHIFTED_WINDOWS * WINDOW)))
    held_rows = np.arange(len(texts), len(texts) + len(held))
    count = SHIFT_WINDOWS * WINDOW
    for share in (0.3, 0.2, 0.1):
        rows = np.where(rng.random(count) < share, rng.choice(held_rows, count), balanced(count))
        results[f"e_held_out_supersenses_{int(share * 100)}pct"] = _summary(_windows(reference, stream, rows))

    session = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    encoder = TextTokenizer(task.tokenizer_file, task.max_length)
    names = {i.name for i in session.get_inputs()}
    encoded = encoder.encode([data.test.texts[0]])
    feeds = {k: v for k, v in encoded.items() if k in names}
    (logits,) = session.run([task.output_name], feeds)

    def request_features() -> dict[str, np.ndarray]:
        found = F.text_features(encoded["input_ids"], encoded["attention_mask"], encoder.unknown_id, task.max_length)
        found.update(F.output_features(logits))
        return found

    results["per_request"] = _per_request(reference, session, feeds, request_features, 20000)
    results["per_request"]["text"] = data.test.texts[0]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fashion-mnist-build", type=Path, default=Path("/tmp/fm-out"))
    parser.add_argument("--demo-build", type=Path, default=Path("/tmp/demo-out"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "drift.json")
    parser.add_argument("--skip-text", action="store_true")
    parser.add_argument("--skip-images", action="store_true")
    args = parser.parse_args()
    rng = np.random.default_rng(2024)
    results: dict = {"window_size": WINDOW, "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                     "cpus": os.cpu_count()}
    if not args.skip_images:
        results["fashion_mnist"] = fashion_mnist(args.fashion_mnist_build, rng)
    if not args.skip_text:
        results["demo_text"] = demo_text(args.demo_build, rng)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
