"""Pruning sequential CNNs (the image task's ``builtin:small-cnn``): whole conv output channels.

A plain ``nn.Sequential`` chain of Conv2d → BatchNorm2d → activation / pooling
blocks ending in Flatten → Linear (or another Conv2d) loses the least important
``ratio`` of each prunable conv's output channels, with the consumer's matching
input columns; the pruned widths go into ``image_model.json``. Ranking is
``edgekit.pruning.taylor_scores`` (or weight norms); recovery is the image
task's training loop for ``recovery_steps`` batches.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np

from edgekit import training
from edgekit.artifact import Artifact, PassContext, Stage
from edgekit.config import PruneSection
from edgekit.pruning import DEFAULT_RATIO, SUPPORTED, PruneError, export_for_timing, parameter_count, taylor_scores, timing_metrics
from edgekit.results import PruneResult
from edgekit.tasks.image_classification import KIND, TASK, INPUT_NAME, ImageSettings, LoopSettings, accuracy, train_model



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


def conv_importance(model, batches: list[training.Batch], method: str = "taylor") -> list[np.ndarray]:
    """One score per output channel of each prunable conv (``conv_units`` order), on ``batches`` of labelled images."""
    import torch

    chain = flatten_sequential(model)
    first = batches[0].inputs[INPUT_NAME] if method == "taylor" else None
    units = conv_units(chain, first[:1] if first is not None else _example_input(chain))
    if method == "magnitude":
        return [chain[u.conv].weight.detach().flatten(1).norm(dim=1).numpy() for u in units]
    scores = [torch.zeros(chain[u.conv].out_channels, dtype=torch.float64) for u in units]

    def per_channel_sums(per_channel: int):
        # Linear after Flatten: channel c owns inputs c*per_channel ... (c+1)*per_channel-1; Conv2d: sum over pixels
        return lambda p: p.reshape(p.shape[0], -1, per_channel).sum(-1) if p.ndim == 2 else p.sum(dim=(2, 3))

    consumers = [(chain[u.consumer], s, per_channel_sums(u.per_channel)) for u, s in zip(units, scores, strict=True)]
    taylor_scores(model, batches, training.cross_entropy(TASK.forward), consumers)
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


def prune_cnn(artifact: Artifact, settings: PruneSection, task_settings: ImageSettings, ctx: PassContext) -> Artifact:
    """The prune pass for image models: conv channels out, widths recorded, optional recovery, measured before and after."""
    import torch

    from edgekit.tasks import image_models

    if settings.goal != "ratio":
        raise PruneError("latency goals (prune.speedup, prune.target_latency_ms) are implemented for text encoders only; "
                         "set prune.ratio for image models")
    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    model, record = image_models.load(artifact.directory)
    if record.family != "small-cnn":
        raise PruneError(f"prune does not support the image model {record.source!r}; supported: {SUPPORTED} "
                         f"({image_models.SMALL_CNN} is one)")
    spec, train, val = artifact.task, ctx.data.train, ctx.data.val
    rows = min(settings.calibration_rows, len(train))
    batches = [training.Batch(inputs, torch.from_numpy(train.labels[start:start + len(inputs[INPUT_NAME])]))
               for start, inputs in zip(range(0, rows, 32), TASK.torch_batches(spec, train.head(rows), 32))]
    parameters_before = parameter_count(model)
    importance = conv_importance(model, batches, settings.importance)
    accuracy_before = accuracy(model, val, spec)
    timing_dir = ctx.work_dir / "timing"
    timing_dir.mkdir()
    unpruned = export_for_timing(lambda folder: image_models.save(model, record, folder), KIND, timing_dir / "unpruned.onnx")
    ratio = settings.ratio or DEFAULT_RATIO
    example = batches[0].inputs[INPUT_NAME][:1]
    channels = prune_sequential_cnn(model, importance, ratio, example)
    if channels["channels_before"] == channels["channels_after"]:
        raise PruneError(f"ratio {ratio} removes no channel from convs of {channels['channels_before']} channels; raise prune.ratio")
    # small_cnn has one conv per stage, so the pruned widths rebuild it exactly at load time.
    record = replace(record, widths=channels["channels_after"])
    accuracy_pruned = accuracy(model, val, spec)
    recovery = None
    if settings.recovery_steps:
        loop = LoopSettings(1, settings.recovery_batch_size, settings.recovery_learning_rate, 0.01, 0.1, 1, settings.seed,
                            settings.recovery_steps * settings.recovery_batch_size, task_settings.train.augment)
        recovery = train_model(model, ctx.data, spec, loop, ctx, "prune.recovery", keep_initial=True)
    accuracy_after = accuracy(model, val, spec)
    pruned = export_for_timing(lambda folder: image_models.save(model, record, folder), KIND, timing_dir / "pruned.onnx")
    metrics = {
        "architecture": record.source, "goal": "ratio", "ratio": ratio, "importance": settings.importance, "calibration_rows": rows,
        **channels, "parameters": {"before": parameters_before, "after": parameter_count(model)},
        **timing_metrics(unpruned, pruned, {INPUT_NAME: example.numpy()}, "fp32 ONNX Runtime on the build host, batch 1, alternating rounds"),
        "val_accuracy": {"before": accuracy_before, "pruned": accuracy_pruned, "recovered": accuracy_after if recovery else None},
        "recovery": recovery, "seconds": time.perf_counter() - started,
    }
    image_models.save(model, record, ctx.work_dir)
    import shutil

    shutil.rmtree(timing_dir)
    ctx.say(f"prune: conv channels {channels['channels_before']} → {channels['channels_after']}; validation accuracy "
            f"{accuracy_before:.4f} → {accuracy_after:.4f}; ONNX Runtime p50 {metrics['latency_p50_ms']['before']:.2f} → "
            f"{metrics['latency_p50_ms']['after']:.2f} ms")
    return Artifact(Stage.TORCH, ctx.work_dir, ".", artifact.digest, spec, results=artifact.recording(prune=PruneResult(**metrics)))
