"""Drift monitor benchmark: false alarms on unshifted windows, detection delay for known shifts, per-request cost.

    python bench/drift_bench.py [--demo-build /tmp/demo-out] [--out bench/results/drift.json]

Fashion-MNIST (/usr/share/datasets/fashion-mnist, IDX): (a) unshifted, (b) brightness/contrast shift, (c) class-prior
shift. No Fashion-MNIST bundle exists yet, so the output features come from a numpy softmax regression trained here on
train[:50000] -- a stand-in, said so in the results. Reference: test[:5000]; unshifted windows: resampled from the
15,000 rows neither saw (train[50000:], test[5000:]).

Text, the demo bundle (`edgekit build --out DIR`): (d) unshifted, (e) another domain mixed in (lines of the GNU/Apache
licence texts in /usr/share/common-licenses: the WordNet database is not installed here to take held-out supersenses).
Reference: the validation split and the first half of the test split through the final model; unshifted windows are
resampled from the other half of the test split.
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import time
from pathlib import Path

import numpy as np

from device_agent import features as F
from device_agent.drift import DriftMonitor, MonitorSettings
from edgekit.drift_reference import build_reference

WINDOW = 500
UNSHIFTED_WINDOWS = 200
SHIFT_WINDOWS = 10


def _idx(path: Path) -> np.ndarray:
    data = gzip.open(path).read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def _windows(reference, features: dict[str, np.ndarray], rows: np.ndarray) -> list[dict]:
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
    top = windows[first - 1]["top_features"][:3] if first else []
    return {"windows": len(windows), "drifting_windows": sum(drifting), "rate": sum(drifting) / len(windows),
            "alert_windows": sum(alerts), "first_drifting_window": first, "first_alert_window": first_alert, "top_features": top}


def _softmax_regression(x: np.ndarray, y: np.ndarray, classes: int, epochs: int = 15, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    weights = np.zeros((x.shape[1] + 1, classes), np.float32)
    xb = np.hstack([x, np.ones((len(x), 1), np.float32)])
    for _ in range(epochs):
        for batch in np.array_split(rng.permutation(len(x)), len(x) // 256):
            logits = xb[batch] @ weights
            p = np.exp(logits - logits.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            p[np.arange(len(batch)), y[batch]] -= 1
            weights -= 0.5 * xb[batch].T @ p / len(batch)
    return weights


def fashion_mnist(root: Path, rng: np.random.Generator) -> dict:
    train_x, train_y = _idx(root / "train-images-idx3-ubyte.gz"), _idx(root / "train-labels-idx1-ubyte.gz")
    test_x, test_y = _idx(root / "t10k-images-idx3-ubyte.gz"), _idx(root / "t10k-labels-idx1-ubyte.gz")
    weights = _softmax_regression(train_x[:50000].reshape(50000, -1).astype(np.float32) / 255, train_y[:50000].astype(int), 10)

    def features(images: np.ndarray) -> dict[str, np.ndarray]:
        flat = images.reshape(len(images), -1).astype(np.float32) / 255
        found = F.image_features(images)
        found.update(F.output_features(np.hstack([flat, np.ones((len(flat), 1), np.float32)]) @ weights))
        return found

    started = time.perf_counter()
    reference = build_reference(features(test_x[:5000]), task="image-classification", labels=[str(i) for i in range(10)],
                                window_size=WINDOW)
    build_s = time.perf_counter() - started
    held_x = np.concatenate([train_x[50000:], test_x[5000:]])
    held_y = np.concatenate([train_y[50000:], test_y[5000:]])
    accuracy = float(((features(held_x)["output.predicted_class"]) == held_y).mean())
    held = features(held_x)
    results = {"reference_build_s": round(build_s, 2), "stand_in_model_accuracy": round(accuracy, 4)}
    results["a_unshifted"] = _summary(_windows(reference, held, rng.integers(0, len(held_x), UNSHIFTED_WINDOWS * WINDOW)))
    shifted = features(np.clip(held_x.astype(np.float32) * 0.9 + 20, 0, 255).astype(np.uint8))
    results["b_brightness_contrast"] = {"shift": "pixel * 0.9 + 20", **_summary(
        _windows(reference, shifted, rng.integers(0, len(held_x), SHIFT_WINDOWS * WINDOW)))}
    mild = features(np.clip(held_x.astype(np.float32) + 8, 0, 255).astype(np.uint8))
    results["b_brightness_mild"] = {"shift": "pixel + 8", **_summary(
        _windows(reference, mild, rng.integers(0, len(held_x), SHIFT_WINDOWS * WINDOW)))}
    # Class prior: half of every window from classes 0 and 1 (T-shirt, trouser), the rest as before.
    favoured = np.flatnonzero(held_y <= 1)
    rows = np.where(rng.random(SHIFT_WINDOWS * WINDOW) < 0.5, rng.choice(favoured, SHIFT_WINDOWS * WINDOW),
                    rng.integers(0, len(held_x), SHIFT_WINDOWS * WINDOW))
    results["c_class_prior"] = {"shift": "50% of rows from classes 0-1", **_summary(_windows(reference, held, rows))}
    results["model"] = "numpy softmax regression trained here on train[:50000] (stand-in: no Fashion-MNIST bundle yet)"
    return results


def demo_text(build: Path, rng: np.random.Generator) -> dict:
    from edgekit.config import BuildConfig
    from edgekit.drift_reference import model_features
    from edgekit.tasks.text_classification import load_task_data

    quantized = build / "x86-64-cpu" / "passes" / "04-quantize"
    final = quantized / "model.onnx"  # the final model, whether or not the host's latency gate let it be packaged
    task = json.loads((quantized / "artifact.json").read_text())["task"]
    tokenizer, max_length = Path(task["tokenizer_file"]), task["max_length"]
    data = load_task_data(BuildConfig().data)
    test = list(data.test.texts)
    half = len(test) // 2
    kwargs = {"tokenizer_file": tokenizer, "max_length": max_length}
    reference_rows = list(data.val.texts) + test[:half]
    started = time.perf_counter()
    reference = build_reference(model_features(final, reference_rows, **kwargs), task="text-classification",
                                labels=list(data.labels), window_size=WINDOW)
    build_s = time.perf_counter() - started
    held = model_features(final, test[half:], **kwargs)
    other = [line.strip() for path in sorted(Path("/usr/share/common-licenses").glob("*")) if path.is_file()
             for line in path.read_text(errors="replace").splitlines() if len(line.split()) >= 5][:3000]
    foreign = model_features(final, other, **kwargs)
    results = {"model": str(final), "reference_rows": len(reference_rows), "held_out_rows": len(test) - half,
               "reference_build_s": round(build_s, 2), "other_domain_rows": len(other)}
    results["d_unshifted"] = _summary(_windows(reference, held, rng.integers(0, len(test) - half, UNSHIFTED_WINDOWS * WINDOW)))
    mixed = {name: np.concatenate([held[name], foreign[name]]) for name in held}
    for share in (0.3, 0.1):
        rows = np.where(rng.random(SHIFT_WINDOWS * WINDOW) < share, len(test) - half + rng.integers(0, len(other), SHIFT_WINDOWS * WINDOW),
                        rng.integers(0, len(test) - half, SHIFT_WINDOWS * WINDOW))
        results[f"e_other_domain_{int(share * 100)}pct"] = _summary(_windows(reference, mixed, rows))

    # Per-request cost: what the agent adds to one text request (features + counting), against one model run.
    import onnxruntime

    from device_agent.preprocess import TextTokenizer

    session = onnxruntime.InferenceSession(str(final), providers=["CPUExecutionProvider"])
    encoder = TextTokenizer(tokenizer, max_length)
    names = {i.name for i in session.get_inputs()}
    encoded = encoder.encode([test[0]])
    feeds = {k: v for k, v in encoded.items() if k in names}
    for _ in range(20):
        (logits,) = session.run(None, feeds)[:1]
    runs = 200
    started = time.perf_counter()
    for _ in range(runs):
        session.run(None, feeds)
    inference_us = (time.perf_counter() - started) / runs * 1e6
    monitor = DriftMonitor(reference, None, MonitorSettings(window_size=10**9, window_seconds=1e12))
    calls = 20000
    started = time.perf_counter()
    for _ in range(calls):
        found = F.text_features(encoded["input_ids"], encoded["attention_mask"], encoder.unknown_id, max_length)
        found.update(F.output_features(logits))
        monitor.observe(found, 1, 1.0)
    monitor_us = (time.perf_counter() - started) / calls * 1e6
    started = time.perf_counter()
    for _ in range(calls):
        monitor.observe(found, 1, 1.0)
    counting_us = (time.perf_counter() - started) / calls * 1e6
    results["per_request"] = {"features_and_counting_us": round(monitor_us, 1), "counting_only_us": round(counting_us, 1),
                              "model_inference_us": round(inference_us, 1), "share_of_inference": round(monitor_us / inference_us, 4)}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-build", type=Path, default=Path("/tmp/demo-out"))
    parser.add_argument("--fashion-mnist", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "drift.json")
    parser.add_argument("--skip-text", action="store_true")
    args = parser.parse_args()
    rng = np.random.default_rng(2024)
    results = {"window_size": WINDOW, "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
               "fashion_mnist": fashion_mnist(args.fashion_mnist, rng)}
    if not args.skip_text:
        results["demo_text"] = demo_text(args.demo_build, rng)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
