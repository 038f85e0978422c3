"""Pruning Hugging Face encoders of BERT's layout (BERT, MiniLM, RoBERTa): whole attention heads and FFN neurons.

1. Rank (``edgekit.pruning.taylor_scores``) on ``calibration_rows`` labelled
   train rows, or by weight norms (``magnitude``).
2. Remove. Heads are ranked across layers (scores normalised per layer, at
   least one head kept per layer) and removed with transformers' ``prune_heads``,
   which records them in ``config.pruned_heads``: ``from_pretrained`` re-applies
   that per-layer dict, so export and reload see the same shapes. FFN neurons are
   removed in the same number from every layer (the least important of each
   layer): ``config.intermediate_size`` is one integer, and a folder whose layers
   disagree with it would not load anywhere else (optimum's exporter, the
   finetune pass, a user's ``from_pretrained``). The kept width is rounded up to
   a multiple of 8, the GEMM kernels' tile width.
3. Goal. A fixed ``ratio``, or a latency goal (``speedup`` or
   ``target_latency_ms``): the smallest ratio on a 0.05 grid whose exported
   model meets it, found by bisection, each candidate exported as the export
   pass exports and timed in ONNX Runtime at batch 1 against the unpruned model
   in alternating rounds.
4. Recover (``recovery_steps`` > 0): a short full fine-tune on the train split
   in the training loop, learning the unpruned model's logits as well as the
   labels; the recovered model is kept only when validation accuracy says it is better.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgekit import training
from edgekit.artifact import Artifact, PassContext, Stage
from edgekit.config import PruneSection
from edgekit.data import Split
from edgekit.pruning import DEFAULT_RATIO, SUPPORTED, PruneError, batch_one_feeds, export_for_timing, parameter_count, taylor_scores, timing_metrics
from edgekit.results import PruneResult
from edgekit.tasks.text_classification import KIND, TASK, with_tokenizer_in

# Model families whose encoder layers have BERT's module layout (attention.self/output, intermediate, output).
BERT_LAYOUT = ("bert", "roberta")
GEMM_TILE = 8
RATIO_GRID = 0.05
DISTILLATION_TEMPERATURE = 2.0
RANKING_BATCH = 16



@dataclass(frozen=True)
class EncoderImportance:
    """Per layer: one score per remaining head ([layers, heads]) and per FFN neuron ([layers, neurons])."""

    heads: np.ndarray
    neurons: np.ndarray


@dataclass(frozen=True)
class EncoderPlan:
    heads: dict[int, list[int]]  # layer -> current head positions to remove
    neurons_kept: list[np.ndarray]  # layer -> sorted neuron indices to keep (same length in every layer)


def encoder_layers(model):
    """The encoder's layers, or a PruneError naming what is supported."""
    family = getattr(model.config, "model_type", None)
    layers = getattr(getattr(getattr(model, "base_model", None), "encoder", None), "layer", None)
    if family not in BERT_LAYOUT or layers is None:
        raise PruneError(f"prune does not support {family or type(model).__name__!r} models; supported: {SUPPORTED}")
    return layers


def encoder_importance(model, batches: Iterable[training.Batch], method: str = "taylor") -> EncoderImportance:
    """Score every head and FFN neuron on ``batches`` of labelled inputs (unused for ``magnitude``)."""
    import torch

    layers = encoder_layers(model)
    heads_per_layer = [layer.attention.self.num_attention_heads for layer in layers]
    head_size = layers[0].attention.self.attention_head_size
    if method == "magnitude":
        heads = [layer.attention.output.dense.weight.detach().view(-1, n, head_size).norm(dim=(0, 2)).numpy()
                 for layer, n in zip(layers, heads_per_layer, strict=True)]
        neurons = [(layer.intermediate.dense.weight.detach().norm(dim=1) * layer.output.dense.weight.detach().norm(dim=0)).numpy()
                   for layer in layers]
        return EncoderImportance(_ragged(heads), np.stack(neurons))

    head_scores = [torch.zeros(n, dtype=torch.float64) for n in heads_per_layer]
    neuron_scores = [torch.zeros(layer.intermediate.dense.out_features, dtype=torch.float64) for layer in layers]

    consumers = []
    for index, layer in enumerate(layers):
        groups = heads_per_layer[index]
        consumers.append((layer.attention.output.dense, head_scores[index],
                          lambda p, g=groups: p.view(*p.shape[:-1], g, -1).sum(dim=(1, 3))))
        consumers.append((layer.output.dense, neuron_scores[index], lambda p: p.sum(dim=1)))
    taylor_scores(model, batches, training.cross_entropy(TASK.forward), consumers)
    return EncoderImportance(_ragged([s.numpy() for s in head_scores]), np.stack([s.numpy() for s in neuron_scores]))


def _ragged(rows: list[np.ndarray]) -> np.ndarray:
    """Rows of different lengths (layers already pruned unevenly) padded with +inf, which is never removed."""
    width = max(len(r) for r in rows)
    out = np.full((len(rows), width), np.inf)
    for index, row in enumerate(rows):
        out[index, : len(row)] = row
    return out


def plan_encoder(importance: EncoderImportance, ratio: float) -> EncoderPlan:
    """Which heads and neurons go at ``ratio``: heads globally (at least one per layer), neurons evenly per layer."""
    heads = importance.heads
    finite = np.isfinite(heads)
    # Michel et al. normalise each layer's head scores so that layers with larger gradients do not keep all their heads.
    norms = np.linalg.norm(np.where(finite, heads, 0.0), axis=1, keepdims=True)
    normalised = np.where(finite, heads / np.maximum(norms, 1e-30), np.inf)
    total = int(finite.sum())
    to_remove = round(ratio * total)
    remaining = finite.sum(1).astype(int)
    removal: dict[int, list[int]] = {}
    for flat in np.argsort(normalised, axis=None, kind="stable"):
        if to_remove == 0:
            break
        layer, head = divmod(int(flat), heads.shape[1])
        if not finite[layer, head] or remaining[layer] <= 1:
            continue
        removal.setdefault(layer, []).append(head)
        remaining[layer] -= 1
        to_remove -= 1
    width = importance.neurons.shape[1]
    keep = width - round(ratio * width)
    if width >= 4 * GEMM_TILE:
        keep = min(width, math.ceil(keep / GEMM_TILE) * GEMM_TILE)
    keep = max(keep, 1)
    kept = [np.sort(np.argsort(-scores, kind="stable")[:keep]) for scores in importance.neurons]
    return EncoderPlan({layer: sorted(h) for layer, h in removal.items()}, kept)


def removes_something(importance: EncoderImportance, plan: EncoderPlan) -> bool:
    return bool(plan.heads) or any(len(kept) < importance.neurons.shape[1] for kept in plan.neurons_kept)


def apply_encoder_plan(model, plan: EncoderPlan) -> None:
    """Remove the planned heads and neurons in place; the config then describes the smaller model."""
    import torch
    from transformers.pytorch_utils import prune_linear_layer

    layers = encoder_layers(model)
    original_heads = model.config.num_attention_heads
    by_original: dict[int, list[int]] = {}
    for layer, positions in plan.heads.items():
        # prune_heads takes head numbers of the unpruned model; positions count only the heads still there.
        alive = [h for h in range(original_heads) if h not in layers[layer].attention.pruned_heads]
        by_original[layer] = [alive[p] for p in positions]
    if by_original:
        model.prune_heads(by_original)
    for layer, keep in zip(layers, plan.neurons_kept, strict=True):
        if len(keep) == layer.intermediate.dense.out_features:
            continue
        index = torch.as_tensor(keep, dtype=torch.long)
        layer.intermediate.dense = prune_linear_layer(layer.intermediate.dense, index, dim=0)
        layer.output.dense = prune_linear_layer(layer.output.dense, index, dim=1)
    model.config.intermediate_size = len(plan.neurons_kept[0])


def encoder_shape(model) -> dict:
    layers = encoder_layers(model)
    return {"heads": [layer.attention.self.num_attention_heads for layer in layers],
            "intermediate": [layer.intermediate.dense.out_features for layer in layers]}


# --------------------------------------------------------------------------- sequential CNNs


# --------------------------------------------------------------------------- recovery


def recovery_order(rows: int, settings: PruneSection) -> np.ndarray:
    """The train rows recovery visits, in order: seeded epochs of shuffled rows, cut at steps x batch size."""
    import torch

    generator = torch.Generator().manual_seed(settings.seed)
    wanted = settings.recovery_steps * settings.recovery_batch_size
    return torch.cat([torch.randperm(rows, generator=generator) for _ in range(math.ceil(wanted / rows))]).numpy()[:wanted]


def _logits(model, spec, split: Split) -> np.ndarray:
    return training.predict(model, TASK.torch_batches(spec, split), TASK.forward)


def _accuracy(model, spec, split: Split) -> float:
    from edgekit.measure import classification_metrics

    return classification_metrics(split.labels, _logits(model, spec, split).argmax(-1), spec.labels).accuracy


def teacher_logits(model, spec, train: Split, settings: PruneSection) -> np.ndarray:
    """The unpruned model's logits for the rows recovery will visit (other rows stay zero: they are never read)."""
    rows = np.unique(recovery_order(len(train), settings))
    logits = _logits(model, spec, train.subset(rows))
    full = np.zeros((len(train), logits.shape[1]), dtype=np.float32)
    full[rows] = logits
    return full


def recover(model, teacher: np.ndarray | None, spec, train: Split, settings: PruneSection, ctx: PassContext) -> dict:
    """Fine-tune the pruned model for ``recovery_steps`` on the train split (labels, plus the teacher's logits when given)."""
    import torch

    def batch(rows: np.ndarray, _epoch: int) -> training.Batch:
        inputs = {k: torch.from_numpy(v) for k, v in TASK.feeds(spec, [train.texts[i] for i in rows]).items()}
        return training.Batch(inputs, torch.from_numpy(train.labels[rows]),
                              torch.from_numpy(teacher[rows]) if teacher is not None else None)

    steps = settings.recovery_steps
    batches = training.InOrder(recovery_order(len(train), settings), settings.recovery_batch_size, batch)
    fit_settings = training.FitSettings(1, settings.recovery_learning_rate, 0.01, "linear", max(1, steps // 10),
                                        label="prune: recovery fine-tuning")
    result = training.fit(model, batches, training.distillation(TASK.forward, DISTILLATION_TEMPERATURE), fit_settings,
                          progress=ctx.progress)
    return {"steps": steps, "seconds": result.seconds, "distillation": teacher is not None,
            "learning_rate": settings.recovery_learning_rate, "batch_size": settings.recovery_batch_size,
            "final_loss": float(np.mean(result.losses[-20:])) if result.losses else None}


# --------------------------------------------------------------------------- a latency goal


def export_encoder(model, source: Path, output: Path) -> Path:
    """``model`` exported to ONNX as the export pass exports text models (``source`` has the tokenizer files)."""
    return export_for_timing(lambda folder: TASK.save_torch(model, source, folder), KIND, output)


def _meets(settings: PruneSection, baseline_ms: float, candidate_ms: float) -> bool:
    if settings.speedup:
        return baseline_ms / candidate_ms >= settings.speedup
    return candidate_ms <= settings.target_latency_ms


def search_ratio(model, importance: EncoderImportance, settings: PruneSection, source: Path, baseline: Path, feeds,
                 say) -> tuple[float, list[dict]]:
    """The smallest ratio on the grid whose exported model meets the latency goal (bisection; latency falls as the ratio grows)."""
    from edgekit.pruning import compare_latency

    grid = [round(RATIO_GRID * i, 4) for i in range(1, int(settings.max_ratio / RATIO_GRID + 1e-9) + 1)] or [settings.max_ratio]
    # On a small model the lowest ratios round to removing nothing; timing the unpruned model again says nothing.
    grid = [ratio for ratio in grid if removes_something(importance, plan_encoder(importance, ratio))] or grid[-1:]
    trials: list[dict] = []

    def meets(ratio: float) -> bool:
        candidate = copy.deepcopy(model)
        apply_encoder_plan(candidate, plan_encoder(importance, ratio))
        path = export_encoder(candidate, source, baseline.parent / f"candidate-{ratio:.2f}.onnx")
        timing = compare_latency({"before": baseline, "after": path}, feeds)
        before, after = timing["before"].p50_ms, timing["after"].p50_ms
        ok = _meets(settings, before, after)
        trials.append({"ratio": ratio, "latency_p50_ms_before": before, "latency_p50_ms": after, "speedup": before / after, "meets_goal": ok})
        say(f"prune: ratio {ratio:.2f}: {after:.2f} ms vs {before:.2f} ms unpruned ({before / after:.2f}x) — {'meets' if ok else 'misses'} the goal")
        path.unlink()
        return ok

    if not meets(grid[-1]):
        best = trials[-1]
        goal = f"speedup {settings.speedup}x" if settings.speedup else f"target_latency_ms {settings.target_latency_ms}"
        raise PruneError(f"the latency goal ({goal}) is out of reach: pruning max_ratio {grid[-1]} gives "
                         f"{best['latency_p50_ms']:.2f} ms ({best['speedup']:.2f}x) on this host; lower the goal or raise prune.max_ratio")
    low, high = -1, len(grid) - 1  # grid[high] meets the goal; grid[low] (if any) does not
    while high - low > 1:
        middle = (low + high) // 2
        if meets(grid[middle]):
            high = middle
        else:
            low = middle
    return grid[high], trials


# --------------------------------------------------------------------------- the prune step of a text build


def ranking_batches(spec, split: Split, rows: int, batch_size: int = RANKING_BATCH) -> list[training.Batch]:
    """The first ``rows`` labelled rows of ``split`` as batches for ranking."""
    import torch

    rows = min(rows, len(split))
    return [training.Batch({k: torch.from_numpy(v) for k, v in TASK.feeds(spec, split.texts[start:min(start + batch_size, rows)]).items()},
                           torch.from_numpy(split.labels[start:min(start + batch_size, rows)]))
            for start in range(0, rows, batch_size)]


def prune_encoder(artifact: Artifact, settings: PruneSection, ctx: PassContext) -> Artifact:
    """The prune pass for text models: rank, choose the ratio, remove, recover, and measure before and after."""
    import torch

    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    spec, train, val = artifact.task, ctx.data.train, ctx.data.val
    model = TASK.load_torch(artifact.directory)
    encoder_layers(model)
    shape_before, parameters_before = encoder_shape(model), parameter_count(model)
    ctx.say(f"prune: ranking heads and FFN neurons ({settings.importance}, {min(settings.calibration_rows, len(train))} train rows)")
    importance = encoder_importance(model, ranking_batches(spec, train, settings.calibration_rows), settings.importance)
    timing_dir = ctx.work_dir / "timing"
    timing_dir.mkdir()
    baseline = export_encoder(model, artifact.directory, timing_dir / "unpruned.onnx")
    feeds = batch_one_feeds(artifact, [val.texts[0] if len(val) else "a"])
    search: list[dict] = []
    if settings.goal == "ratio":
        ratio = settings.ratio or DEFAULT_RATIO
    else:
        ratio, search = search_ratio(model, importance, settings, artifact.directory, baseline, feeds, ctx.say)
    plan = plan_encoder(importance, ratio)
    if not removes_something(importance, plan):
        raise PruneError(f"ratio {ratio} removes nothing from this model ({sum(shape_before['heads'])} heads, "
                         f"{shape_before['intermediate'][0]} FFN neurons per layer); raise prune.ratio")
    accuracies, recovery, kept = _remove_and_recover(model, plan, spec, settings, ctx, shape_before)
    pruned = export_encoder(model, artifact.directory, timing_dir / "pruned.onnx")
    shape_after = encoder_shape(model)
    TASK.save_torch(model, artifact.directory, ctx.work_dir)
    metrics = {
        "architecture": model.config.model_type, "goal": settings.goal, "ratio": ratio, "importance": settings.importance,
        "calibration_rows": min(settings.calibration_rows, len(train)),
        "heads_before": shape_before["heads"], "heads_after": shape_after["heads"],
        "heads_removed_per_layer": [b - a for b, a in zip(shape_before["heads"], shape_after["heads"], strict=True)],
        "pruned_heads": {str(k): sorted(v) for k, v in model.config.pruned_heads.items()},
        "neurons_before": shape_before["intermediate"], "neurons_after": shape_after["intermediate"],
        "neurons_removed_per_layer": [b - a for b, a in zip(shape_before["intermediate"], shape_after["intermediate"], strict=True)],
        "parameters": {"before": parameters_before, "after": parameter_count(model)},
        **timing_metrics(baseline, pruned, feeds, f"fp32 ONNX Runtime on the build host, batch 1, sequence {spec.max_length}, alternating rounds"),
        "val_accuracy": accuracies, "kept": kept, "recovery": recovery, "search": search, "seconds": time.perf_counter() - started,
    }
    ctx.say(f"prune: ONNX Runtime p50 at batch 1 {metrics['latency_p50_ms']['before']:.2f} → "
            f"{metrics['latency_p50_ms']['after']:.2f} ms ({metrics['speedup']:.2f}x), "
            f"{metrics['parameters']['before'] / 1e6:.2f}M → {metrics['parameters']['after'] / 1e6:.2f}M parameters")
    # The timing exports are 2 fp32 copies of the model; the export pass writes the one that ships.
    import shutil

    shutil.rmtree(timing_dir)
    return Artifact(Stage.TORCH, ctx.work_dir, ".", artifact.digest, with_tokenizer_in(artifact, ctx.work_dir),
                    results=artifact.recording(prune=PruneResult(**metrics)))


def _remove_and_recover(model, plan: EncoderPlan, spec, settings: PruneSection, ctx: PassContext, shape_before: dict):
    """Apply the plan, then recover; the recovered weights are kept only when validation accuracy does not fall."""
    train, val = ctx.data.train, ctx.data.val
    accuracy_before = _accuracy(model, spec, val)
    teacher = teacher_logits(model, spec, train, settings) if settings.recovery_steps and settings.distillation else None
    apply_encoder_plan(model, plan)
    accuracy_pruned = _accuracy(model, spec, val)
    ctx.say(f"prune: removed {sum(len(h) for h in plan.heads.values())} heads and "
            f"{shape_before['intermediate'][0] - len(plan.neurons_kept[0])} FFN neurons per layer; "
            f"validation accuracy {accuracy_before:.4f} → {accuracy_pruned:.4f}")
    accuracy_recovered, recovery, kept = None, None, "pruned (no recovery fine-tune)"
    if settings.recovery_steps:
        pruned_state = training.snapshot(model)
        recovery = recover(model, teacher, spec, train, settings, ctx)
        accuracy_recovered = _accuracy(model, spec, val)
        ctx.say(f"prune: after {settings.recovery_steps} recovery steps validation accuracy {accuracy_recovered:.4f}")
        if accuracy_recovered >= accuracy_pruned:
            kept = "pruned and recovered"
        else:
            model.load_state_dict(pruned_state)
            kept = "pruned (recovery did not beat it on validation)"
    return {"before": accuracy_before, "pruned": accuracy_pruned, "recovered": accuracy_recovered}, recovery, kept
