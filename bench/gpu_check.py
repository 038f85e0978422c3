"""The CUDA paths of the training loop and of quantization-aware training, checked on a machine with an NVIDIA GPU.

    python bench/gpu_check.py [--out bench/results/gpu_check.json]

Needs only torch and numpy (no tokenizer, no model download): a small BERT is
built from a config and trained on random token sequences whose label is a rule
of the tokens, so the numbers are reproducible anywhere. What it checks:

1. ``edgekit.training.fit`` picks CUDA, trains under bf16 autocast, and the
   loss falls; ``predict`` on the GPU gives the CPU's predictions.
2. ``edgekit.fake_quant.dynamic_int8`` computes the same int8-emulated logits on
   the GPU (fp32) as on the CPU, and how far bf16 autocast would move them (why
   the qat pass turns autocast off: ``FitSettings.bf16_autocast=False``).
3. A QAT phase as the qat pass runs it (``fit`` inside ``dynamic_int8``,
   distillation, eval mode, float32) runs on CUDA, and its emulated agreement
   with the float model is reported.

Nothing is asserted: the results are written as JSON and printed.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VOCAB, LENGTH, ROWS, CLASSES = 1000, 32, 4096, 4


def _data(seed: int):
    import torch

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (ROWS, LENGTH), generator=generator)
    labels = ids[:, 0] % CLASSES  # a rule of the first token: learnable in a few epochs
    return ids, labels


def _model():
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512,
                        max_position_embeddings=LENGTH, num_labels=CLASSES)
    return BertForSequenceClassification(config)


def _forward(model, inputs):
    return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits


def _batches(ids, labels, teacher=None):
    import torch

    from edgekit import training

    def make(rows, _epoch):
        inputs = {"input_ids": ids[rows], "attention_mask": torch.ones_like(ids[rows])}
        return training.Batch(inputs, labels[rows], teacher[rows] if teacher is not None else None)

    return training.Shuffled(len(ids), 64, 0, make)


def _predict(model, ids, device: str) -> np.ndarray:
    import torch

    model = model.to(device).eval()
    with torch.no_grad():
        outputs = [_forward(model, {"input_ids": ids[i:i + 256].to(device), "attention_mask": torch.ones_like(ids[i:i + 256]).to(device)})
                   for i in range(0, len(ids), 256)]
    return torch.cat(outputs).float().cpu().numpy()


def main() -> int:
    import torch
    from rich.progress import Progress

    from edgekit import fake_quant, training

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gpu_check.json")
    args = parser.parse_args()
    result: dict = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "host": platform.node(),
                    "torch": torch.__version__, "cuda": torch.cuda.is_available()}
    gpu = "cuda" if torch.cuda.is_available() else "cpu"  # without CUDA the script still runs: a smoke test, nothing checked
    result["gpu"] = torch.cuda.get_device_name(0) if gpu == "cuda" else None
    result["bf16"] = gpu == "cuda" and torch.cuda.is_bf16_supported()
    ids, labels = _data(0)
    test_ids, test_labels = _data(1)

    model = _model()
    started = time.perf_counter()
    fitted = training.fit(model, _batches(ids, labels), training.cross_entropy(_forward), training.FitSettings(3, 1e-3),
                          progress=Progress(disable=True))
    per_epoch = np.array_split(np.asarray(fitted.losses), 3)
    gpu_logits, cpu_logits = _predict(model, test_ids, gpu), _predict(model, test_ids, "cpu")
    result["fit"] = {
        "device": fitted.device, "seconds": round(time.perf_counter() - started, 2),
        "mean_loss_per_epoch": [round(float(part.mean()), 4) for part in per_epoch],
        "test_accuracy": float(np.mean(cpu_logits.argmax(-1) == test_labels.numpy())),
        "gpu_vs_cpu_prediction_agreement": float(np.mean(gpu_logits.argmax(-1) == cpu_logits.argmax(-1))),
        "gpu_vs_cpu_max_abs_logit_difference": float(np.abs(gpu_logits - cpu_logits).max()),
    }

    float_logits = cpu_logits
    emulated = {}
    for device in ("cpu", gpu):
        with fake_quant.dynamic_int8(model):
            emulated[device] = _predict(model, test_ids, device)
    model.to(gpu)
    with fake_quant.dynamic_int8(model), torch.no_grad(), torch.autocast(gpu, dtype=torch.bfloat16):
        inputs = {"input_ids": test_ids[:512].to(gpu), "attention_mask": torch.ones_like(test_ids[:512]).to(gpu)}
        emulated_bf16 = _forward(model.eval(), inputs).float().cpu().numpy()
    result["fake_quant"] = {
        "gpu_fp32_vs_cpu_max_abs_difference": float(np.abs(emulated[gpu] - emulated["cpu"]).max()),
        "gpu_bf16_autocast_vs_cpu_fp32_max_abs_difference": float(np.abs(emulated_bf16 - emulated["cpu"][:512]).max()),
        "emulated_int8_agreement_with_float": float(np.mean(emulated["cpu"].argmax(-1) == float_logits.argmax(-1))),
        "logit_scale": float(np.abs(float_logits).max()),
    }

    student = copy.deepcopy(model).cpu()
    teacher = torch.from_numpy(_predict(model, ids, "cpu"))

    def agreement(candidate) -> float:
        return float(np.mean(_predict(candidate, test_ids, gpu).argmax(-1) == float_logits.argmax(-1)))  # fp32: no autocast there

    with fake_quant.dynamic_int8(student):
        before = agreement(student)
        qat = training.fit(student, _batches(ids, labels, teacher), training.distillation(_forward, 2.0, label_weight=0.0),
                           training.FitSettings(1, 2e-5, 0.0, train_mode=False, bf16_autocast=False), progress=Progress(disable=True))
        after = agreement(student)
    result["qat"] = {"device": qat.device, "seconds": round(qat.seconds, 2), "emulated_agreement_before": before,
                     "emulated_agreement_after": after, "mean_loss": round(float(np.mean(qat.losses)), 5)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
