"""Where int8 loses the demo's agreement with fp32, and what quantization-aware training (the qat pass) wins back.

    python bench/int8_fidelity_bench.py                 # writes bench/results/int8_fidelity.json (about 30 minutes on 2 cores)
    python bench/int8_fidelity_bench.py --keep /tmp/ib  # keep builds and models

For the head-only demo, the LoRA-fine-tuned demo (examples/wordnet-finetune.yaml)
and the same LoRA settings on a second text set (``bench/docstring_data.py``:
docstrings of six Python libraries, 3,000 rows), each built for x86-64-cpu
without QAT, it measures at batch 1 with ONNX Runtime on the CPU, on the
validation and test splits:

- the build's own bundle (the quantize search's mixed-precision model): nodes kept
  in float, test agreement, latency (from its report);
- all-int8 (every candidate node quantized, per-channel dynamic) of the same float
  graph: agreement with fp32, accuracy, size and p50 latency (one text padded to
  the task's 128 tokens, as the evaluate pass times) next to fp32;
- the int8 error by source, in the PyTorch emulation (``edgekit.fake_quant``):
  weights only, activations only;
- all-int8 after SmoothQuant (``edgekit.smoothing``) at each alpha the quantize pass
  tries, calibrated as the pass calibrates;
- the qat pass with the config's defaults (enabled): the emulated agreement before
  and after, the trained float model's own agreement, and all-int8 of its export.
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEMOS = ("head-only", "lora", "docstrings-lora")
LATENCY_RUNS = 200


def _build(config: Path | None, out: Path, cache: Path) -> dict:
    command = [sys.executable, "-m", "edgekit", "build", *([str(config)] if config else []), "--out", str(out), "--cache-dir", str(cache)]
    finished = subprocess.run(command, capture_output=True, text=True, check=False)
    if finished.returncode not in (0, 1):  # 1: gates failed, which is one of the things measured here
        raise SystemExit(f"build failed:\n{finished.stdout[-3000:]}\n{finished.stderr[-3000:]}")
    return json.loads((out / "x86-64-cpu" / "report.json").read_text())


def _export_artifact(out: Path):
    from edgekit.build_output import pass_output

    found = pass_output(out, ("export",))
    if found is None or found.artifact is None:
        raise SystemExit(f"the build in {out} has no export pass output in the cache; rebuild it")
    return found.artifact


def _smoothed_all_int8(source: Path, folder: Path, data, spec, alpha: float) -> Path:
    """All-int8 of the fused graph after SmoothQuant at ``alpha``, with the quantize pass's own calibration rule."""
    import onnx
    from onnxruntime.transformers.optimizer import optimize_model

    from edgekit import smoothing
    from edgekit.passes.quantize import SMOOTHING_ROWS
    from edgekit.tasks import model_feeds

    fused = folder / f"{source.parent.name}-fused.onnx"
    if not fused.is_file():
        optimize_model(str(source), model_type="bert", num_heads=0, hidden_size=0, opt_level=0).save_model_to_file(str(fused))
    model = onnx.load(fused)
    rows = data.calibration.inputs[:SMOOTHING_ROWS]
    maxima = smoothing.input_channel_maxima(model, (model_feeds(spec, rows[i:i + 1]) for i in range(len(rows))))
    smoothed = folder / f"smoothed-{alpha}" / "model.onnx"
    smoothed.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(smoothing.smoothed(model, maxima, alpha), smoothed)
    return _all_int8(smoothed, smoothed.parent, fused=False)


def _all_int8(source: Path, folder: Path, fused: bool = True) -> Path:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    quantized = folder / f"{source.parent.name}-int8.onnx"
    if fused:
        graph = folder / f"{source.parent.name}-fused.onnx"
        optimize_model(str(source), model_type="bert", num_heads=0, hidden_size=0, opt_level=0).save_model_to_file(str(graph))
    else:  # already fused (and smoothed)
        graph = source
    quantize_dynamic(graph, quantized, per_channel=True, weight_type=QuantType.QInt8,
                     extra_options={"WeightSymmetric": True, "DefaultTensorType": onnx.TensorProto.FLOAT})
    return quantized


class _Runner:
    """Batch-1 logits of ONNX models on the build's splits (as a device serves one request at a time)."""

    def __init__(self, spec, data) -> None:
        from edgekit.tasks import model_feeds

        self.data = data
        self.feeds = {split: [model_feeds(spec, [text]) for text in getattr(data, split).inputs] for split in ("val", "test")}
        self.timing_feed = model_feeds(spec, data.test.inputs[:1], pad_to_max_length=True)  # as the evaluate pass times

    def logits(self, path: Path, split: str) -> np.ndarray:
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = {value.name for value in session.get_inputs()}
        return np.concatenate([session.run(None, {k: v for k, v in feed.items() if k in names})[0] for feed in self.feeds[split]])

    def p50_ms(self, path: Path) -> float:
        import onnxruntime as ort

        from edgekit.measure import latency

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = {value.name for value in session.get_inputs()}
        feed = {k: v for k, v in self.timing_feed.items() if k in names}
        return latency(lambda: session.run(None, feed), iterations=LATENCY_RUNS).p50_ms


def _compare(runner: _Runner, reference: dict, candidate: Path) -> dict:
    from edgekit.measure import fidelity

    row = {}
    for split in ("val", "test"):
        logits = runner.logits(candidate, split)
        labels = getattr(runner.data, split).labels
        measured = fidelity(reference[split], logits)
        row[split] = {"agreement": measured.top1_agreement, "flips": measured.flips,
                      "agreement_lower_95": round(measured.top1_agreement_lower_95, 4),
                      "accuracy": float(np.mean(logits.argmax(-1) == labels)),
                      "fp32_accuracy": float(np.mean(reference[split].argmax(-1) == labels))}
    return row


def _emulated_by_source(artifact, data) -> dict:
    """Validation agreement of the int8 emulation with only weights, or only activations, quantized."""
    from edgekit import fake_quant, training
    from edgekit.tasks import task_for

    task = task_for(artifact.task.kind)
    model = task.load_torch(artifact.trained_model)

    def logits():
        return training.predict(model, task.torch_batches(artifact.task, data.val, 1), task.forward)

    reference = logits()
    results = {}
    for name, keep in (("weights_only", "dynamic_activation"), ("activations_only", "weights")):
        saved = {attr: getattr(fake_quant, attr) for attr in ("dynamic_activation", "per_channel_int8", "per_tensor_uint8")}
        try:
            if keep == "dynamic_activation":
                fake_quant.dynamic_activation = lambda x, tokens=None: x
            else:
                fake_quant.per_channel_int8 = fake_quant.per_tensor_uint8 = lambda w: w
            with fake_quant.dynamic_int8(model):
                results[name] = float(np.mean(logits().argmax(-1) == reference.argmax(-1)))
        finally:
            for attr, function in saved.items():
                setattr(fake_quant, attr, function)
    return results


def _qat(artifact, data, folder: Path) -> tuple[dict, Path]:
    from rich.progress import Progress

    from edgekit.artifact import PassContext
    from edgekit.config import QatSection
    from edgekit.passes import export, qat

    folder.mkdir(parents=True, exist_ok=True)
    context = PassContext(folder, data, Progress(disable=True), folder / "unused.key", lambda _line: None)
    options = qat.Options(qat=QatSection(enabled=True), export=export.Options(opset=17, parity_atol=1e-3, parity_samples=16))
    started = time.perf_counter()
    trained = qat.run(artifact, options, context)
    record = trained.results.qat.model_dump(mode="json")
    record["wall_seconds"] = round(time.perf_counter() - started, 1)
    return record, trained.model_path


def measure_demo(name: str, config: Path | None, work: Path, cache: Path) -> dict:
    from edgekit.config import load_build_config
    from edgekit.measure import size_mb
    from edgekit.tasks import load_task_data

    out = work / name
    report = _build(config, out, cache)
    artifact = _export_artifact(out)
    data = load_task_data(load_build_config(config))
    runner = _Runner(artifact.task, data)
    reference = {split: runner.logits(artifact.model_path, split) for split in ("val", "test")}
    all_int8 = _all_int8(artifact.model_path, work / name)
    final = report["metrics"]["final"]
    row = {
        "bundle": {"passed": report["passed"], "precision": report["precision"], "kept_in_float": len(report["kept_in_float"]),
                   "test_agreement": final["top1_agreement"],
                   "test_flips": final["flips"], "test_agreement_batched_32": final.get("batched_top1_agreement"),
                   "smoothing_alpha": (report["quantization"].get("smoothing") or {}).get("alpha"),
                   "latency_p50_ms": final["latency_p50_ms"], "size_mb": final["size_mb"]},
        "fp32": {"size_mb": size_mb(artifact.model_path), "latency_p50_ms": runner.p50_ms(artifact.model_path)},
        "all_int8": {**_compare(runner, reference, all_int8), "size_mb": size_mb(all_int8), "latency_p50_ms": runner.p50_ms(all_int8)},
        "emulated_val_agreement_by_source": _emulated_by_source(artifact, data),
        "smoothed_all_int8": {},
    }
    from edgekit.passes.quantize import SMOOTHING_ALPHAS

    for alpha in SMOOTHING_ALPHAS:
        smoothed = _smoothed_all_int8(artifact.model_path, work / name, data, artifact.task, alpha)
        row["smoothed_all_int8"][str(alpha)] = {**_compare(runner, reference, smoothed), "size_mb": size_mb(smoothed),
                                                "latency_p50_ms": runner.p50_ms(smoothed)}
    qat_record, qat_model = _qat(artifact, data, work / name / "qat")
    row["qat"] = {"pass": qat_record, "all_int8": _compare(runner, reference, _all_int8(qat_model, work / name / "qat"))}
    return row


def demo_config(name: str, work: Path) -> Path | None:
    """The build config of one demo (None: the embedded demo)."""
    import yaml

    if name == "head-only":
        return None
    if name == "lora":
        return ROOT / "examples" / "wordnet-finetune.yaml"
    sys.path.insert(0, str(Path(__file__).parent))
    from docstring_data import build as build_docstrings

    data = work / "docstrings.csv"
    if not data.is_file():
        build_docstrings(data, per_class=500)
    document = yaml.safe_load((ROOT / "examples" / "wordnet-finetune.yaml").read_text())
    document["model"]["name"] = "docstrings"
    document["data"] = {"path": str(data), "calibration_path": None}  # calibration rows from its own train split
    config = work / "docstrings.yaml"
    config.write_text(yaml.safe_dump(document))
    return config


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="keep builds and models here")
    parser.add_argument("--cache-dir", type=Path, help="pass cache (default: inside the work folder)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "int8_fidelity.json")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="int8-fidelity-"))
    cache = args.cache_dir or work / "cache"
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "host": platform.node(),
              "cpu_count": os.cpu_count(), "load_average_start": os.getloadavg(), "demos": {}}
    work.mkdir(parents=True, exist_ok=True)
    for name in DEMOS:
        result["demos"][name] = measure_demo(name, demo_config(name, work), work, cache)
        print(json.dumps({name: result["demos"][name]}, indent=2), flush=True)
    result["load_average_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
