"""Tasks: what a model does, where its data comes from, how its inputs are made, how it trains and exports.

Passes ask the task; they do not branch on it. A task is one module with one
object that has the methods of :class:`Task`, listed once in :data:`TASKS`.
Adding a task (time series, tabular, ...) is one new module and one line here;
``tests/edgekit/test_task_interface.py`` does exactly that with a toy task and
builds a signed bundle with it.

Raw inputs become model tensors through ``Task.feeds``, which for the shipped
tasks is the device's own code (``device_agent.preprocess``), so a pass that
feeds a model (export parity, optimize, quantize calibration, evaluate, package
golden vectors) and a device serving the bundle turn the same raw input into
the same tensors.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from edgekit.errors import EdgekitError
from edgekit.tasks import (
    anomaly_detection,
    image_classification,
    tabular_classification,
    text_classification,
    timeseries_classification,
)

if TYPE_CHECKING:
    import torch
    from pydantic import BaseModel

    from edgekit.artifact import Artifact, PassContext, TaskSpec
    from edgekit.config import BuildConfig, FinetuneSection, PruneSection
    from edgekit.data import Split, TaskData
    from edgekit.search_space import Dimension


class Task(Protocol):
    """What the passes need of a task. ``settings`` is the task's slice of the build config: it is part of the cache key
    of the passes that train or export, and is handed back to ``load``, ``finetune`` and ``prune``."""

    kind: str  # the config's task.kind
    bundle_kind: str  # the manifest's task.kind (text-classification, image-classification or tensor)
    graph_fusion: str | None  # ONNX Runtime transformer-fusion model type for the optimize pass, or None
    builtin_sources: tuple[str, ...]  # model.source values that name models defined in edgekit (builtin:..., config:...)
    onnx_sources: tuple[str, ...]  # those of them trained straight to ONNX (load-to-onnx: no PyTorch stage)
    definitions: tuple[Path, ...]  # the files that define them and what they are trained on: their bytes are part of their cache key
    # int8 schemes whose numerics edgekit.fake_quant emulates for this task's models: quantization-aware training runs
    # for targets with one of them (it calls load_torch, forward, torch_batches, save_torch and export_onnx)
    quantization_aware_schemes: tuple[str, ...]
    # what a search may tune (edgekit.search_space), and the values it tries first after the build as written
    search_space: tuple[Dimension, ...]
    search_starts: tuple[dict[str, Any], ...]

    def settings(self, config: BuildConfig) -> BaseModel: ...

    def config_problems(self, config: BuildConfig) -> list[str]: ...  # what the task cannot take, each with its fix

    def load_data(self, config: BuildConfig) -> TaskData: ...

    # the torch stage: a model folder in, a model folder out
    def load(self, source: str, digest: str, settings: Any, ctx: PassContext) -> Artifact: ...

    def finetune(self, artifact: Artifact, settings: FinetuneSection, task_settings: Any, ctx: PassContext) -> Artifact: ...

    def prune(self, artifact: Artifact, settings: PruneSection, task_settings: Any, ctx: PassContext) -> Artifact: ...

    def load_torch(self, folder: Path) -> torch.nn.Module: ...

    def save_torch(self, model: torch.nn.Module, source: Path, folder: Path) -> None: ...  # a model loaded from source

    def forward(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def torch_batches(self, spec: TaskSpec, split: Split, batch_size: int = ...) -> Iterator[dict[str, torch.Tensor]]: ...

    # ONNX and the device
    def export_onnx(self, folder: Path, output: Path, opset: int, say) -> None: ...

    def feeds(self, spec: TaskSpec, inputs: Any, *, pad_to_max_length: bool = False) -> dict[str, np.ndarray]: ...


    def bundle_preprocessing(self, spec: TaskSpec) -> Any: ...

    def bundle_files(self, spec: TaskSpec) -> dict[str, Path]: ...

    def input_shape(self, spec: TaskSpec) -> dict: ...

    def drift_reference(self, model_path: Path, spec: TaskSpec, splits: Sequence[Split]) -> Any: ...


# The registry: a literal mapping a reader can see, no automatic registration.
TASKS: dict[str, Task] = {
    text_classification.KIND: text_classification.TASK,
    image_classification.KIND: image_classification.TASK,
    timeseries_classification.KIND: timeseries_classification.TASK,
    tabular_classification.KIND: tabular_classification.TASK,
    anomaly_detection.KIND: anomaly_detection.TASK,
}


def task_for(kind: str) -> Task:
    try:
        return TASKS[kind]
    except KeyError:
        raise EdgekitError(f"unknown task {kind!r}; known: {', '.join(TASKS)}") from None


def builtin_owner(source: str) -> Task | None:
    """The task whose built-in models include ``source`` (``builtin:...``, ``config:...``), or None."""
    return next((task for task in TASKS.values() if source in task.builtin_sources), None)


def model_feeds(task: TaskSpec, inputs: Sequence[str] | np.ndarray, *, pad_to_max_length: bool = False) -> dict[str, np.ndarray]:
    """The model's input tensors for a batch of raw inputs (texts, uint8 images ``[n, height, width, channels]``, ...).

    ``pad_to_max_length`` pads texts to the task's ``max_length`` for fixed-shape timing; tasks whose inputs have a
    fixed shape ignore it.
    """
    return task_for(task.kind).feeds(task, inputs, pad_to_max_length=pad_to_max_length)


def load_task_data(config: BuildConfig) -> TaskData:
    """Read, clean and split the build's data for its task."""
    return task_for(config.task.kind).load_data(config)
