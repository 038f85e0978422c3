"""Structured pruning: whole attention heads and FFN neurons (``encoder``) or conv channels (``cnn``) leave the weights.

Structured, not sparse: the removed rows and columns leave the weight matrices,
so every runtime runs fewer multiply-adds without knowing about pruning. Both
algorithms rank their groups the same way, by a first-order Taylor estimate of
how much the loss would change if a group's output were zeroed: per example
|sum(gradient x activation)| at the input of the layer that consumes the group
(Molchanov et al. 2017; for a head this is the head-mask gradient of Michel et
al. 2019), computed here by :func:`taylor_scores`. ``magnitude`` uses weight
norms and no data. What the two share besides the ranking is here too: the
before/after latency in ONNX Runtime (models exported by the task's own
exporter, the one the export pass uses) and the report's numbers.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgekit.errors import EdgekitError

if TYPE_CHECKING:
    import torch

    from edgekit.artifact import Artifact
    from edgekit.training import Batch

DEFAULT_RATIO = 0.3
SUPPORTED = ("Hugging Face encoders of model_type bert, roberta (BERT, MiniLM, RoBERTa) and plain "
             "nn.Sequential CNNs of Conv2d/BatchNorm2d/activation/pooling blocks ending in Flatten → Linear")


class PruneError(EdgekitError):
    """The model cannot be pruned as configured."""


def taylor_scores(model: torch.nn.Module, batches: Iterable[Batch], loss,
                  consumers: list[tuple[torch.nn.Module, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]]) -> None:
    """Add each group's Taylor importance into its score tensor.

    ``consumers``: (the layer whose input carries the groups, the float64 score per group, a function from the
    input's gradient x activation to per-example sums per group ``[n, groups]``). Zeroing a group changes the loss by
    about -sum(g * a) over its units and tokens (padding has g = 0).
    """
    from edgekit.training import accumulate_gradients

    def hook(score: torch.Tensor, per_group: Callable[[torch.Tensor], torch.Tensor]):
        def on_input(_module, inputs):
            activation = inputs[0]

            def on_gradient(gradient):
                score.add_(per_group((gradient * activation.detach()).double()).abs().sum(0))

            activation.register_hook(on_gradient)

        return on_input

    handles = [layer.register_forward_pre_hook(hook(score, per_group)) for layer, score, per_group in consumers]
    try:
        # eval mode inside: the ranking should not depend on which units a random dropout mask dropped
        accumulate_gradients(model, batches, loss)
    finally:
        for handle in handles:
            handle.remove()


def parameter_count(model) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def ort_session(path: Path):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


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


def export_for_timing(save: Callable[[Path], None], kind: str, output: Path, opset: int = 17) -> Path:
    """A model as the export pass would export it: ``save(folder)`` writes the torch-stage folder, the task exports it."""
    import torch

    from edgekit.tasks import task_for

    # Loading the saved folder initialises a model (random draws) before its weights arrive: keep the caller's stream.
    with tempfile.TemporaryDirectory(dir=output.parent) as folder, torch.random.fork_rng(devices=[]):
        save(Path(folder))
        task_for(kind).export_onnx(Path(folder), output, opset, lambda _message: None)
    return output


def timing_metrics(before: Path, after: Path, feeds: dict[str, np.ndarray], note: str) -> dict:
    """The report's size and batch-1 latency rows of the unpruned and the pruned ONNX model."""
    from edgekit.measure import size_mb

    timing = compare_latency({"before": before, "after": after}, feeds)
    return {
        "size_mb": {"before": size_mb(before), "after": size_mb(after)},
        "latency_p50_ms": {"before": timing["before"].p50_ms, "after": timing["after"].p50_ms},
        "latency_p95_ms": {"before": timing["before"].p95_ms, "after": timing["after"].p95_ms},
        "speedup": timing["before"].p50_ms / timing["after"].p50_ms,
        "latency_note": note,
    }


def batch_one_feeds(artifact: Artifact, example) -> dict[str, np.ndarray]:
    """One input, padded to the task's fixed shape, as the evaluate pass times latency."""
    from edgekit.tasks import model_feeds

    return model_feeds(artifact.task, example, pad_to_max_length=True)
