"""prune: remove whole attention heads and FFN neurons (or conv channels) so the exported model is smaller and faster.

Structured, not sparse: the removed rows and columns leave the weight matrices,
so every runtime runs fewer multiply-adds without knowing about pruning.

1. Rank. ``taylor`` (default) estimates, on ``calibration_rows`` labelled train
   rows, how much the loss would change if a group's output were zeroed: per
   example |sum(gradient x activation)| at the input of the layer that consumes
   the group (Molchanov et al. 2017; for a head this is the head-mask gradient of
   Michel et al. 2019). ``magnitude`` uses weight norms and no data.
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
   model meets it, found by bisection, each candidate exported and timed in
   ONNX Runtime at batch 1 against the unpruned model in alternating rounds.
4. Recover (``recovery_steps`` > 0): a short full fine-tune on the train split,
   learning the unpruned model's logits as well as the labels; the recovered
   model is kept only when validation accuracy says it is better.

CNNs: a plain ``nn.Sequential`` chain of Conv2d → BatchNorm2d → activation /
pooling blocks ending in Flatten → Linear loses whole conv output channels the
same way (``prune_sequential_cnn``).
"""

from __future__ import annotations

import copy
import math
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict

from edgekit.artifact import Artifact, Pass, PassContext, Stage
from edgekit.config import BuildConfig, PruneSection
from edgekit.errors import EdgekitError
from edgekit.passes.load import TOKENIZER_FILES
from edgekit.targets import TargetProfile

DEFAULT_RATIO = 0.3
# Model families whose encoder layers have BERT's module layout (attention.self/output, intermediate, output).
BERT_LAYOUT = ("bert", "roberta")
SUPPORTED = (f"Hugging Face encoders of model_type {', '.join(BERT_LAYOUT)} (BERT, MiniLM, RoBERTa) and plain "
             "nn.Sequential CNNs of Conv2d/BatchNorm2d/activation/pooling blocks ending in Flatten → Linear")
GEMM_TILE = 8
RATIO_GRID = 0.05
DISTILLATION_TEMPERATURE = 2.0


class PruneError(EdgekitError):
    """The model cannot be pruned as configured."""


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    prune: PruneSection
    max_length: int


def options_for(config: BuildConfig, target: TargetProfile | None) -> Options:
    return Options(prune=config.prune, max_length=config.task.max_length)


# --------------------------------------------------------------------------- transformer encoders


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


def encoder_importance(model, batches, method: str = "taylor") -> EncoderImportance:
    """Score every head and FFN neuron; ``batches`` yields (model inputs, labels) tensors (unused for ``magnitude``)."""
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

    def taylor(scores: torch.Tensor, groups: int):
        def on_input(_module, inputs):
            activation = inputs[0]

            def on_gradient(gradient):
                # Zeroing a group changes the loss by about -sum(g * a) over its units and tokens (padding has g = 0).
                product = (gradient * activation.detach()).double()
                per_example = product.view(*product.shape[:-1], groups, -1).sum(dim=(1, 3))
                scores.add_(per_example.abs().sum(0))

            activation.register_hook(on_gradient)

        return on_input

    hooks = []
    for index, layer in enumerate(layers):
        hooks.append(layer.attention.output.dense.register_forward_pre_hook(taylor(head_scores[index], heads_per_layer[index])))
        hooks.append(layer.output.dense.register_forward_pre_hook(taylor(neuron_scores[index], neuron_scores[index].numel())))
    was_training = model.training
    model.eval()  # dropout off: the ranking should not depend on which units a random mask dropped
    try:
        for inputs, labels in batches:
            model.zero_grad(set_to_none=True)
            model(**inputs, labels=labels).loss.backward()
    finally:
        for hook in hooks:
            hook.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
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


@dataclass(frozen=True)
class ConvUnit:
    """A prunable conv: its index in the flattened chain, its BatchNorm (if any), and the layer that consumes its channels."""

    conv: int
    norm: int | None
    consumer: int
    per_channel: int  # consumer inputs per channel (Linear after Flatten: height x width; Conv2d: 1)


def flatten_sequential(model) -> list:
    """The leaf modules of a (nested) nn.Sequential, in order; a PruneError for anything else."""
    import torch

    if not isinstance(model, torch.nn.Sequential):
        raise PruneError(f"prune does not support {type(model).__name__} modules; supported: {SUPPORTED}")
    leaves = []
    for module in model:
        leaves.extend(flatten_sequential(module) if isinstance(module, torch.nn.Sequential) else [module])
    return leaves


# Modules that act on each channel alone, so a removed channel stays absent (and zero) through them.
_CHANNELWISE = ("ReLU", "ReLU6", "GELU", "SiLU", "Hardswish", "LeakyReLU", "Sigmoid", "Tanh", "MaxPool2d", "AvgPool2d",
                "AdaptiveAvgPool2d", "AdaptiveMaxPool2d", "Dropout", "Dropout2d", "Identity")


def conv_units(chain: list, example) -> list[ConvUnit]:
    """Find each Conv2d whose channels feed, through channel-wise layers, one Conv2d or Flatten → Linear."""
    import torch

    shapes, value = [], example
    with torch.no_grad():
        for module in chain:
            shapes.append(tuple(value.shape))
            value = module(value)
    units = []
    for index, module in enumerate(chain):
        if not isinstance(module, torch.nn.Conv2d):
            continue
        if module.groups != 1:
            raise PruneError(f"layer {index} is a grouped/depthwise Conv2d (groups={module.groups}); prune supports groups=1 convs")
        norm, cursor = None, index + 1
        while cursor < len(chain) and (isinstance(chain[cursor], torch.nn.BatchNorm2d) or type(chain[cursor]).__name__ in _CHANNELWISE):
            if isinstance(chain[cursor], torch.nn.BatchNorm2d):
                if norm is not None:
                    break
                norm = cursor
            cursor += 1
        if cursor < len(chain) and isinstance(chain[cursor], torch.nn.Conv2d) and chain[cursor].groups == 1:
            units.append(ConvUnit(index, norm, cursor, 1))
        elif cursor + 1 < len(chain) and isinstance(chain[cursor], torch.nn.Flatten) and isinstance(chain[cursor + 1], torch.nn.Linear):
            _channels, *spatial = shapes[cursor][1:]
            units.append(ConvUnit(index, norm, cursor + 1, int(np.prod(spatial)) if spatial else 1))
        # Any other consumer (a residual add, a reshape): this conv keeps its channels.
    if not units:
        raise PruneError(f"found no prunable Conv2d → [BatchNorm2d] → activation/pooling → Conv2d or Flatten → Linear chain; supported: {SUPPORTED}")
    return units


def conv_importance(model, batches, method: str = "taylor") -> list[np.ndarray]:
    """One score per output channel of each prunable conv (``conv_units`` order); ``batches`` yields (images, labels)."""
    import torch

    chain = flatten_sequential(model)
    first = next(iter(batches))[0] if method == "taylor" else None
    units = conv_units(chain, first[:1] if first is not None else _example_input(chain))
    if method == "magnitude":
        return [chain[u.conv].weight.detach().flatten(1).norm(dim=1).numpy() for u in units]
    scores = [torch.zeros(chain[u.conv].out_channels, dtype=torch.float64) for u in units]

    def taylor(score: torch.Tensor, per_channel: int):
        def on_input(_module, inputs):
            activation = inputs[0]

            def on_gradient(gradient):
                product = (gradient * activation.detach()).double()
                per_example = product.reshape(product.shape[0], -1, per_channel).sum(-1) if product.ndim == 2 else product.sum(dim=(2, 3))
                score.add_(per_example.abs().sum(0))

            activation.register_hook(on_gradient)

        return on_input

    hooks = [chain[u.consumer].register_forward_pre_hook(taylor(s, u.per_channel)) for u, s in zip(units, scores, strict=True)]
    was_training = model.training
    model.eval()
    try:
        for images, labels in batches:
            model.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(images), labels).backward()
    finally:
        for hook in hooks:
            hook.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return [s.numpy() for s in scores]


def _example_input(chain):
    import torch

    first = next(m for m in chain if isinstance(m, torch.nn.Conv2d))
    return torch.zeros(1, first.in_channels, 32, 32)


def prune_sequential_cnn(model, importance: list[np.ndarray], ratio: float, example) -> dict:
    """Remove the least important ``ratio`` of each prunable conv's output channels in place; returns channels before/after."""
    import torch

    chain = flatten_sequential(model)
    units = conv_units(chain, example)
    before, after = [], []
    for unit, scores in zip(units, importance, strict=True):
        conv = chain[unit.conv]
        width = conv.out_channels
        keep_count = max(1, width - round(ratio * width))
        keep = torch.as_tensor(np.sort(np.argsort(-scores, kind="stable")[:keep_count]), dtype=torch.long)
        conv.weight = torch.nn.Parameter(conv.weight.detach()[keep].clone())
        if conv.bias is not None:
            conv.bias = torch.nn.Parameter(conv.bias.detach()[keep].clone())
        conv.out_channels = keep_count
        if unit.norm is not None:
            norm = chain[unit.norm]
            for name in ("weight", "bias"):
                if getattr(norm, name) is not None:
                    setattr(norm, name, torch.nn.Parameter(getattr(norm, name).detach()[keep].clone()))
            for name in ("running_mean", "running_var"):
                if getattr(norm, name) is not None:
                    setattr(norm, name, getattr(norm, name)[keep].clone())
            norm.num_features = keep_count
        consumer = chain[unit.consumer]
        if isinstance(consumer, torch.nn.Conv2d):
            consumer.weight = torch.nn.Parameter(consumer.weight.detach()[:, keep].clone())
            consumer.in_channels = keep_count
        else:  # Linear after Flatten: channel c owns inputs c*per_channel ... (c+1)*per_channel-1 (NCHW flattening)
            columns = (keep[:, None] * unit.per_channel + torch.arange(unit.per_channel)).flatten()
            consumer.weight = torch.nn.Parameter(consumer.weight.detach()[:, columns].clone())
            consumer.in_features = len(columns)
        before.append(width)
        after.append(keep_count)
    return {"channels_before": before, "channels_after": after}


# --------------------------------------------------------------------------- measuring


def parameter_count(model) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def export_classifier_onnx(model, path: Path) -> Path:
    """A Hugging Face sequence classifier as ONNX, logits only: dynamic batch and sequence, TorchScript exporter, opset 17."""
    import warnings

    import torch

    class LogitsOnly(torch.nn.Module):
        def __init__(self, inner) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits

    names = ["input_ids", "attention_mask", "token_type_ids"]
    example = tuple(torch.ones(1, 8, dtype=torch.int64) for _ in names)
    dynamic = {name: {0: "batch", 1: "sequence"} for name in names} | {"logits": {0: "batch"}}
    # The tracer's and the legacy exporter's deprecation warnings say nothing about this model.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(LogitsOnly(model.eval()), example, str(path), input_names=names, output_names=["logits"],
                          dynamic_axes=dynamic, opset_version=17, dynamo=False)
    return path


def ort_session(path: Path):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def batch_one_feeds(tokenizer_file: Path, max_length: int, text: str) -> dict[str, np.ndarray]:
    """One text padded to ``max_length``, as the evaluate pass times latency."""
    from device_agent.preprocess import TextTokenizer

    return TextTokenizer(tokenizer_file, max_length, pad_to_max_length=True).encode([text])


def compare_latency(paths: dict[str, Path], feeds: dict[str, np.ndarray], *, rounds: int = 3, iterations: int = 30) -> dict:
    """p50/p95 latency at batch 1 of several ONNX models, measured in alternating rounds (``measure.latency_rounds``)."""
    from edgekit.measure import latency_rounds

    calls = {}
    for name, path in paths.items():
        session = ort_session(path)
        wanted = {i.name for i in session.get_inputs()}
        inputs = {k: v for k, v in feeds.items() if k in wanted}
        calls[name] = (lambda s=session, f=inputs: s.run(None, f))
    return latency_rounds(calls, rounds=rounds, iterations=iterations)


# --------------------------------------------------------------------------- the pass


def _batches(tokenizer, split, rows: int, batch_size: int = 16):
    import torch

    for start in range(0, min(rows, len(split)), batch_size):
        stop = min(start + batch_size, rows, len(split))
        inputs = {k: torch.from_numpy(v) for k, v in tokenizer.encode(split.texts[start:stop]).items()}
        yield inputs, torch.from_numpy(split.labels[start:stop])


def _logits(model, tokenizer, texts, batch_size: int = 64) -> np.ndarray:
    import torch

    model.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = {k: torch.from_numpy(v) for k, v in tokenizer.encode(texts[start:start + batch_size]).items()}
            out.append(model(**batch).logits.float().numpy())
    return np.concatenate(out)


def _accuracy(model, tokenizer, split, labels) -> float:
    from edgekit.measure import classification_metrics

    return classification_metrics(split.labels, _logits(model, tokenizer, split.texts).argmax(-1), labels).accuracy


def recovery_order(rows: int, settings: PruneSection) -> np.ndarray:
    """The train rows recovery visits, in order: seeded epochs of shuffled rows, cut at steps x batch size."""
    import torch

    generator = torch.Generator().manual_seed(settings.seed)
    wanted = settings.recovery_steps * settings.recovery_batch_size
    return torch.cat([torch.randperm(rows, generator=generator) for _ in range(math.ceil(wanted / rows))]).numpy()[:wanted]


def teacher_logits(model, tokenizer, train, settings: PruneSection) -> np.ndarray:
    """The unpruned model's logits for the rows recovery will visit (other rows stay zero: they are never read)."""
    rows = np.unique(recovery_order(len(train), settings))
    logits = _logits(model, tokenizer, [train.texts[i] for i in rows])
    full = np.zeros((len(train), logits.shape[1]), dtype=np.float32)
    full[rows] = logits
    return full


def recover(model, teacher: np.ndarray | None, tokenizer, train, settings: PruneSection, ctx: PassContext) -> dict:
    """Fine-tune the pruned model for ``recovery_steps`` on the train split (labels, plus the teacher's logits when given)."""
    import torch
    import torch.nn.functional as F
    from transformers import get_linear_schedule_with_warmup

    steps = settings.recovery_steps
    order = recovery_order(len(train), settings)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.recovery_learning_rate, weight_decay=0.01)
    schedule = get_linear_schedule_with_warmup(optimizer, max(1, steps // 10), steps)
    started, losses = time.perf_counter(), []
    progress = ctx.progress.add_task("prune: recovery fine-tuning", total=steps)
    model.train()
    for step in range(steps):
        rows = order[step * settings.recovery_batch_size:(step + 1) * settings.recovery_batch_size]
        batch = {k: torch.from_numpy(v) for k, v in tokenizer.encode([train.texts[i] for i in rows]).items()}
        logits = model(**batch).logits
        loss = F.cross_entropy(logits, torch.from_numpy(train.labels[rows]))
        if teacher is not None:
            t = DISTILLATION_TEMPERATURE
            soft = F.kl_div(F.log_softmax(logits / t, -1), F.softmax(torch.from_numpy(teacher[rows]) / t, -1), reduction="batchmean")
            loss = 0.5 * loss + 0.5 * t * t * soft
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        ctx.progress.update(progress, advance=1, description=f"prune: recovery loss {np.mean(losses[-20:]):.3f}")
    ctx.progress.remove_task(progress)
    model.eval()
    return {"steps": steps, "seconds": time.perf_counter() - started, "distillation": teacher is not None,
            "learning_rate": settings.recovery_learning_rate, "batch_size": settings.recovery_batch_size,
            "final_loss": float(np.mean(losses[-20:])) if losses else None}


def _pruned_copy(model, importance: EncoderImportance, ratio: float):
    candidate = copy.deepcopy(model)
    apply_encoder_plan(candidate, plan_encoder(importance, ratio))
    return candidate


def _meets(settings: PruneSection, baseline_ms: float, candidate_ms: float) -> bool:
    if settings.speedup:
        return baseline_ms / candidate_ms >= settings.speedup
    return candidate_ms <= settings.target_latency_ms


def search_ratio(model, importance: EncoderImportance, settings: PruneSection, baseline: Path, feeds, work: Path, say) -> tuple[float, list[dict]]:
    """The smallest ratio on the grid whose exported model meets the latency goal (bisection; latency falls as the ratio grows)."""
    grid = [round(RATIO_GRID * i, 4) for i in range(1, int(settings.max_ratio / RATIO_GRID + 1e-9) + 1)] or [settings.max_ratio]
    # On a small model the lowest ratios round to removing nothing; timing the unpruned model again says nothing.
    grid = [ratio for ratio in grid if removes_something(importance, plan_encoder(importance, ratio))] or grid[-1:]
    trials: list[dict] = []

    def meets(ratio: float) -> bool:
        path = export_classifier_onnx(_pruned_copy(model, importance, ratio), work / f"candidate-{ratio:.2f}.onnx")
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


def run(artifact: Artifact, options: Options, ctx: PassContext) -> Artifact:
    import torch
    from transformers import AutoModelForSequenceClassification

    from device_agent.preprocess import TextTokenizer
    from edgekit.measure import size_mb

    settings = options.prune
    if artifact.task.kind == "image-classification":
        return run_image(artifact, settings, ctx)
    if artifact.task.kind != "text-classification":
        raise PruneError(f"prune does not support {artifact.task.kind!r} builds; supported: {SUPPORTED}")
    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    model = AutoModelForSequenceClassification.from_pretrained(artifact.directory).eval()
    encoder_layers(model)
    tokenizer = TextTokenizer(artifact.task.tokenizer_file, options.max_length)
    train, val = ctx.data.train, ctx.data.val
    shape_before, parameters_before = encoder_shape(model), parameter_count(model)
    ctx.say(f"prune: ranking heads and FFN neurons ({settings.importance}, {min(settings.calibration_rows, len(train))} train rows)")
    importance = encoder_importance(model, list(_batches(tokenizer, train, settings.calibration_rows)), settings.importance)
    timing_dir = ctx.work_dir / "timing"
    timing_dir.mkdir()
    baseline = export_classifier_onnx(model, timing_dir / "unpruned.onnx")
    feeds = batch_one_feeds(artifact.task.tokenizer_file, options.max_length, val.texts[0] if len(val) else "a")
    search: list[dict] = []
    if settings.goal == "ratio":
        ratio = settings.ratio or DEFAULT_RATIO
    else:
        ratio, search = search_ratio(model, importance, settings, baseline, feeds, timing_dir, ctx.say)
    plan = plan_encoder(importance, ratio)
    if not removes_something(importance, plan):
        raise PruneError(f"ratio {ratio} removes nothing from this model ({sum(shape_before['heads'])} heads, "
                         f"{shape_before['intermediate'][0]} FFN neurons per layer); raise prune.ratio")
    accuracy_before = _accuracy(model, tokenizer, val, artifact.task.labels)
    teacher = teacher_logits(model, tokenizer, train, settings) if settings.recovery_steps and settings.distillation else None
    apply_encoder_plan(model, plan)
    accuracy_pruned = _accuracy(model, tokenizer, val, artifact.task.labels)
    ctx.say(f"prune: removed {sum(len(h) for h in plan.heads.values())} heads and "
            f"{shape_before['intermediate'][0] - len(plan.neurons_kept[0])} FFN neurons per layer; "
            f"validation accuracy {accuracy_before:.4f} → {accuracy_pruned:.4f}")
    accuracy_recovered, recovery, kept = None, None, "pruned (no recovery fine-tune)"
    if settings.recovery_steps:
        pruned_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        recovery = recover(model, teacher, tokenizer, train, settings, ctx)
        accuracy_recovered = _accuracy(model, tokenizer, val, artifact.task.labels)
        ctx.say(f"prune: after {settings.recovery_steps} recovery steps validation accuracy {accuracy_recovered:.4f}")
        if accuracy_recovered >= accuracy_pruned:
            kept = "pruned and recovered"
        else:
            model.load_state_dict(pruned_state)
            kept = "pruned (recovery did not beat it on validation)"
    pruned_path = export_classifier_onnx(model, timing_dir / "pruned.onnx")
    timing = compare_latency({"before": baseline, "after": pruned_path}, feeds)
    shape_after = encoder_shape(model)
    model.save_pretrained(ctx.work_dir)
    for name in TOKENIZER_FILES:
        if (artifact.directory / name).is_file():
            shutil.copy(artifact.directory / name, ctx.work_dir / name)
    metrics = {
        "architecture": model.config.model_type, "goal": settings.goal, "ratio": ratio, "importance": settings.importance,
        "calibration_rows": min(settings.calibration_rows, len(train)),
        "heads_before": shape_before["heads"], "heads_after": shape_after["heads"],
        "heads_removed_per_layer": [b - a for b, a in zip(shape_before["heads"], shape_after["heads"], strict=True)],
        "pruned_heads": {str(k): sorted(v) for k, v in model.config.pruned_heads.items()},
        "neurons_before": shape_before["intermediate"], "neurons_after": shape_after["intermediate"],
        "neurons_removed_per_layer": [b - a for b, a in zip(shape_before["intermediate"], shape_after["intermediate"], strict=True)],
        "parameters": {"before": parameters_before, "after": parameter_count(model)},
        "size_mb": {"before": size_mb(baseline), "after": size_mb(pruned_path)},
        "latency_p50_ms": {"before": timing["before"].p50_ms, "after": timing["after"].p50_ms},
        "latency_p95_ms": {"before": timing["before"].p95_ms, "after": timing["after"].p95_ms},
        "speedup": timing["before"].p50_ms / timing["after"].p50_ms,
        "latency_note": f"fp32 ONNX Runtime on the build host, batch 1, sequence {options.max_length}, alternating rounds",
        "val_accuracy": {"before": accuracy_before, "pruned": accuracy_pruned, "recovered": accuracy_recovered},
        "kept": kept, "recovery": recovery, "search": search, "seconds": time.perf_counter() - started,
    }
    ctx.say(f"prune: ONNX Runtime p50 at batch 1 {metrics['latency_p50_ms']['before']:.2f} → "
            f"{metrics['latency_p50_ms']['after']:.2f} ms ({metrics['speedup']:.2f}x), "
            f"{metrics['parameters']['before'] / 1e6:.2f}M → {metrics['parameters']['after'] / 1e6:.2f}M parameters")
    # The timing exports are 2 fp32 copies of the model; the export pass writes the one that ships.
    shutil.rmtree(timing_dir)
    task = replace(artifact.task, tokenizer_file=ctx.work_dir / "tokenizer.json")
    return Artifact(Stage.TORCH, ctx.work_dir, ".", artifact.digest, task, metrics={**artifact.metrics, "prune": metrics})


def run_image(artifact: Artifact, settings: PruneSection, ctx: PassContext) -> Artifact:
    """The image task's small CNN (``edgekit.tasks.image_models``): conv channels out, widths recorded, optional recovery."""
    import contextlib

    import torch

    from edgekit.measure import size_mb
    from edgekit.tasks import image_classification, image_models, model_feeds

    if settings.goal != "ratio":
        raise PruneError("latency goals (prune.speedup, prune.target_latency_ms) are implemented for text encoders only; "
                         "set prune.ratio for image models")
    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    model, record = image_models.load(artifact.directory)
    if record.family != "small-cnn":
        raise PruneError(f"prune does not support the image model {record.source!r}; supported: {SUPPORTED} "
                         f"({image_models.SMALL_CNN} is one)")
    task, train, val = artifact.task, ctx.data.train, ctx.data.val
    input_name = task.input_names[0]

    def pixels(split, start: int, stop: int):
        return torch.from_numpy(model_feeds(task, split.inputs[start:stop])[input_name])

    rows = min(settings.calibration_rows, len(train))
    batches = [(pixels(train, i, min(i + 32, rows)), torch.from_numpy(train.labels[i:min(i + 32, rows)])) for i in range(0, rows, 32)]
    parameters_before = parameter_count(model)
    importance = conv_importance(model, batches, settings.importance)
    accuracy_before = image_classification.accuracy(model, val, task, "cpu", contextlib.nullcontext())
    timing_dir = ctx.work_dir / "timing"
    timing_dir.mkdir()
    image_models.export_onnx(model, record, input_name, timing_dir / "unpruned.onnx", 17)
    ratio = settings.ratio or DEFAULT_RATIO
    channels = prune_sequential_cnn(model, importance, ratio, batches[0][0][:1])
    if channels["channels_before"] == channels["channels_after"]:
        raise PruneError(f"ratio {ratio} removes no channel from convs of {channels['channels_before']} channels; raise prune.ratio")
    # small_cnn has one conv per stage, so the pruned widths rebuild it exactly at load time.
    record = replace(record, widths=channels["channels_after"])
    accuracy_pruned = image_classification.accuracy(model, val, task, "cpu", contextlib.nullcontext())
    recovery = None
    if settings.recovery_steps:
        loop = image_classification.LoopSettings(1, settings.recovery_batch_size, settings.recovery_learning_rate, 0.01, 0.1, 1,
                                                 settings.seed, settings.recovery_steps * settings.recovery_batch_size, True)
        recovery = image_classification.train(model, ctx.data, task, loop, ctx, "prune.recovery", keep_initial=True)
        model.to("cpu").eval()
    accuracy_after = image_classification.accuracy(model, val, task, "cpu", contextlib.nullcontext())
    image_models.export_onnx(model, record, input_name, timing_dir / "pruned.onnx", 17)
    feeds = {input_name: batches[0][0][:1].numpy()}
    timing = compare_latency({"before": timing_dir / "unpruned.onnx", "after": timing_dir / "pruned.onnx"}, feeds)
    image_models.save(model, record, ctx.work_dir)
    metrics = {
        "architecture": record.source, "goal": "ratio", "ratio": ratio, "importance": settings.importance, "calibration_rows": rows,
        **channels, "parameters": {"before": parameters_before, "after": parameter_count(model)},
        "size_mb": {"before": size_mb(timing_dir / "unpruned.onnx"), "after": size_mb(timing_dir / "pruned.onnx")},
        "latency_p50_ms": {"before": timing["before"].p50_ms, "after": timing["after"].p50_ms},
        "latency_p95_ms": {"before": timing["before"].p95_ms, "after": timing["after"].p95_ms},
        "speedup": timing["before"].p50_ms / timing["after"].p50_ms,
        "latency_note": "fp32 ONNX Runtime on the build host, batch 1, alternating rounds",
        "val_accuracy": {"before": accuracy_before, "pruned": accuracy_pruned, "recovered": accuracy_after if recovery else None},
        "recovery": recovery, "seconds": time.perf_counter() - started,
    }
    shutil.rmtree(timing_dir)
    ctx.say(f"prune: conv channels {channels['channels_before']} → {channels['channels_after']}; validation accuracy "
            f"{accuracy_before:.4f} → {accuracy_after:.4f}; ONNX Runtime p50 {metrics['latency_p50_ms']['before']:.2f} → "
            f"{metrics['latency_p50_ms']['after']:.2f} ms")
    return Artifact(Stage.TORCH, ctx.work_dir, ".", artifact.digest, task, metrics={**artifact.metrics, "prune": metrics})


PASS = Pass(
    name="prune",
    version=1,
    takes=frozenset({Stage.TORCH}),
    gives=Stage.TORCH,
    target_specific=False,
    uses_data=True,
    libraries=("torch", "transformers", "onnxruntime"),
    options_for=options_for,
    run=run,
)
