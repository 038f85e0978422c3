"""Tabular classification: labelled rows of numeric and categorical columns in, a small MLP out, raw rows on the device.

Data: ``edgekit.tasks.tabular_data`` (CSV or Parquet). The bundle records how a
raw row becomes the model's input (``device_agent.bundle.TablePreprocessing``:
each numeric column with its fill for a missing value, each categorical column
with its training categories, one-hot plus "other"), and the device runs the
same ``device_agent.preprocess.TableEncoder`` the build does. Model:
``builtin:mlp``, Linear → ReLU → Dropout stages and one Linear; the mean and
standard deviation of each numeric feature over the training rows are buffers
of the model, so standardising is inside the ONNX graph. It trains from
scratch in the load pass (``train:`` settings) and further in the finetune pass
(``method: full``), in the one training loop. The bundle's input is ``features``
``[batch, width]`` FP32; the agent also takes the raw rows (BYTES ``rows``, JSON
objects). Not yet: gradient-boosted trees, pruning.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, ConfigDict

from edgekit.config import BuildConfig, FinetuneSection, PruneSection, SearchRange, TableSection, TrainSection
from edgekit.data import Split, TaskData
from edgekit.errors import EdgekitError
from edgekit.search_space import Dimension
from edgekit.tasks.scratch_training import PREDICT_BATCH, train_classifier

if TYPE_CHECKING:
    import torch

    from device_agent.bundle import TablePreprocessing
    from edgekit.artifact import Artifact, PassContext, TaskSpec

KIND = "tabular-classification"
INPUT_NAME = "features"
MLP = "builtin:mlp"
RECORD_FILE = "table_model.json"
WEIGHTS_FILE = "model.pt"
DEFAULT_WIDTHS = [64, 32]
DROPOUT = 0.1

SEARCH_SPACE = (
    Dimension("train.learning_rate", SearchRange(low=5e-4, high=1e-2, log=True)),
    Dimension("train.epochs", SearchRange(low=5, high=40, integer=True)),
    Dimension("train.batch_size", [32, 64, 128]),
    Dimension("train.weight_decay", SearchRange(low=0.0, high=1e-3)),
    Dimension("model.widths", [[64, 32], [128, 64], [256, 128, 64]]),
)


class TableSettings(BaseModel):
    """What a tabular build's config says about the task (part of the cache key of the passes that train)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    train: TrainSection
    widths: list[int] | None
    table: TableSection


@dataclass(frozen=True)
class TableModelRecord:
    """Enough to rebuild the module before loading its weights, and the table encoding it was trained on."""

    source: str
    classes: int
    widths: list[int]
    mean: list[float]  # per feature, over the training rows (0 for one-hot features)
    std: list[float]  # per feature (1 for one-hot features)
    table: dict  # the TablePreprocessing, as JSON

    def preprocessing(self) -> TablePreprocessing:
        from device_agent.bundle import TablePreprocessing

        return TablePreprocessing.model_validate(self.table)


def build_model(record: TableModelRecord) -> torch.nn.Module:
    """The MLP of ``record``, freshly initialised, standardising its input with the record's statistics."""
    import torch
    from torch import nn

    class TableMLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.tensor(record.mean, dtype=torch.float32).view(1, -1))
            self.register_buffer("std", torch.tensor(record.std, dtype=torch.float32).view(1, -1))
            layers: list[nn.Module] = []
            previous = len(record.mean)
            for width in record.widths:
                layers += [nn.Linear(previous, width), nn.ReLU(), nn.Dropout(DROPOUT)]
                previous = width
            self.hidden = nn.Sequential(*layers)
            self.classifier = nn.Linear(previous, record.classes)

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            return self.classifier(self.hidden((features - self.mean) / self.std))

    return TableMLP()


def save_model(model: torch.nn.Module, record: TableModelRecord, folder: Path) -> None:
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    (folder / RECORD_FILE).write_text(json.dumps(asdict(record), indent=2) + "\n")
    torch.save(model.state_dict(), folder / WEIGHTS_FILE)


def load_model(folder: Path) -> tuple[torch.nn.Module, TableModelRecord]:
    import torch

    record = TableModelRecord(**json.loads((folder / RECORD_FILE).read_text()))
    model = build_model(record)
    model.load_state_dict(torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True))
    return model.eval(), record


def encode(table: TablePreprocessing, rows: Sequence) -> np.ndarray:
    """Raw rows → FP32 features, with the device's own encoder."""
    from device_agent.preprocess import TableEncoder

    return TableEncoder(table)(list(rows))


def feature_statistics(table: TablePreprocessing, features: np.ndarray) -> tuple[list[float], list[float]]:
    """Mean and std per feature over the training rows; one-hot features keep 0 and 1 (already on a unit scale)."""
    mean, std = np.zeros(table.width), np.ones(table.width)
    offset = 0
    for column in table.columns:
        if column.kind == "numeric":
            values = features[:, offset].astype(np.float64)
            mean[offset] = values.mean()
            std[offset] = values.std() if values.std() > 1e-8 else 1.0
        offset += column.width
    return mean.tolist(), std.tolist()


class TabularClassification:
    """The tabular task: see the module docstring."""

    kind = KIND
    bundle_kind = "tabular-classification"
    graph_fusion = None
    builtin_sources = (MLP,)
    definitions = Path(__file__)
    search_space = SEARCH_SPACE
    search_starts: tuple[dict, ...] = ()
    quantization_aware_schemes: tuple[str, ...] = ()

    def settings(self, config: BuildConfig) -> TableSettings:
        return TableSettings(train=config.train, widths=config.model.widths, table=config.task.table)

    def config_problems(self, config: BuildConfig) -> list[str]:
        problems = []
        if config.model.source not in self.builtin_sources:
            problems.append(f"model.source {config.model.source!r} is not a table model; {KIND} takes "
                            f"{', '.join(self.builtin_sources)}")
        if config.finetune.enabled and config.finetune.method == "lora":
            problems.append("finetune.method lora adapts Hugging Face text models; table models are fine-tuned fully: "
                            "set finetune.method: full")
        if config.prune.enabled:
            problems.append(f"prune does not support {KIND} models yet; set prune.enabled: false")
        return problems

    def load_data(self, config: BuildConfig) -> TaskData:
        from edgekit.tasks.tabular_data import load_task_data

        return load_task_data(config.data.path, config.data.test_path, config.data.label_column, config.task.table)

    def spec(self, labels: tuple[str, ...], table: TablePreprocessing) -> TaskSpec:
        from edgekit.artifact import TaskSpec

        return TaskSpec(KIND, labels, 0, None, (INPUT_NAME,), "logits", None, table)

    def load(self, source: str, digest: str, settings: TableSettings, ctx: PassContext) -> Artifact:
        """Describe the table from the training rows, build the MLP with their feature statistics, train it from scratch."""
        import torch

        from edgekit.artifact import Artifact, Stage
        from edgekit.results import LoadResult, PassResults
        from edgekit.tasks.tabular_data import table_spec

        if source != MLP:
            raise EdgekitError(f"model.source {source!r} is not a table model; {KIND} takes {MLP}")
        train_rows = list(ctx.data.train.inputs)
        table = table_spec(train_rows, list(train_rows[0]) if train_rows else [], settings.table)
        train_x = encode(table, train_rows)
        mean, std = feature_statistics(table, train_x)
        record = TableModelRecord(source, len(ctx.data.labels), list(settings.widths or DEFAULT_WIDTHS), mean, std,
                                  table.model_dump(mode="json"))
        torch.manual_seed(settings.train.seed)
        model = build_model(record)
        metrics = train_classifier(model, ctx, settings.train, "train", keep_initial=False, input_name=INPUT_NAME,
                                   train_x=train_x, val_x=encode(table, ctx.data.val.inputs))
        save_model(model, record, ctx.work_dir)
        parameters = sum(p.numel() for p in model.parameters())
        ctx.say(f"trained {source} on {len(table.columns)} columns ({table.width} features, {parameters / 1e3:.1f} k "
                f"parameters): validation accuracy {metrics['val_accuracy']:.4f}")
        return Artifact(Stage.TORCH, ctx.work_dir, ".", digest, self.spec(ctx.data.labels, table),
                        results=PassResults(load=LoadResult(model=source, parameters=parameters, widths=record.widths, **metrics)))

    def finetune(self, artifact: Artifact, settings: FinetuneSection, task_settings: TableSettings, ctx: PassContext) -> Artifact:
        """Every weight trained further with the finetune settings; the loaded model competes."""
        from edgekit.artifact import Artifact, Stage
        from edgekit.results import FinetuneResult

        model, record = load_model(artifact.directory)
        table = record.preprocessing()
        train = TrainSection(epochs=settings.epochs, batch_size=settings.batch_size, learning_rate=settings.learning_rate,
                             weight_decay=settings.weight_decay, warmup_ratio=settings.warmup_ratio,
                             early_stopping_patience=settings.early_stopping_patience, max_train_rows=settings.max_train_rows,
                             seed=settings.seed)
        metrics = train_classifier(model, ctx, train, "finetune", keep_initial=True, input_name=INPUT_NAME,
                                   train_x=encode(table, ctx.data.train.inputs), val_x=encode(table, ctx.data.val.inputs))
        save_model(model, record, ctx.work_dir)
        return Artifact(Stage.TORCH, ctx.work_dir, ".", artifact.digest, artifact.task,
                        results=artifact.recording(finetune=FinetuneResult(method="full", **metrics)))

    def prune(self, artifact: Artifact, settings: PruneSection, task_settings: TableSettings, ctx: PassContext) -> Artifact:
        raise EdgekitError(f"prune does not support {KIND} models yet; set prune.enabled: false")

    def load_torch(self, folder: Path) -> torch.nn.Module:
        return load_model(folder)[0]

    def save_torch(self, model: torch.nn.Module, source: Path, folder: Path) -> None:
        save_model(model, load_model(source)[1], folder)

    @staticmethod
    def forward(model: torch.nn.Module, inputs) -> torch.Tensor:
        return model(inputs[INPUT_NAME])

    def torch_batches(self, spec: TaskSpec, split: Split, batch_size: int = PREDICT_BATCH) -> Iterator[dict[str, torch.Tensor]]:
        import torch

        for start in range(0, len(split), batch_size):
            yield {INPUT_NAME: torch.from_numpy(encode(spec.table, split.inputs[start:start + batch_size]))}

    def export_onnx(self, folder: Path, output: Path, opset: int, say) -> None:
        """torch.onnx (TorchScript exporter; symbolic batch), checked by onnx.checker."""
        import warnings

        import onnx
        import torch

        model, record = load_model(folder)
        say(f"exporting to ONNX (opset {opset}) with torch.onnx")
        example = torch.zeros(1, len(record.mean))
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice says nothing about this model
            torch.onnx.export(model, (example,), str(output), input_names=[INPUT_NAME], output_names=["logits"],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, "logits": {0: "batch"}}, opset_version=opset, dynamo=False)
        onnx.checker.check_model(str(output))

    def feeds(self, spec: TaskSpec, inputs, *, pad_to_max_length: bool = False) -> dict[str, np.ndarray]:
        """Raw rows (dicts) → the ``features`` tensor, as the device encodes them; an FP32 array passes as it is."""
        if isinstance(inputs, np.ndarray) and inputs.dtype != object:
            return {INPUT_NAME: np.ascontiguousarray(inputs, dtype=np.float32)}
        return {INPUT_NAME: encode(spec.table, inputs)}

    def bundle_preprocessing(self, spec: TaskSpec):
        return spec.table

    def bundle_files(self, spec: TaskSpec) -> dict[str, Path]:
        return {}

    def input_shape(self, spec: TaskSpec) -> dict:
        return {}

    def drift_reference(self, model_path: Path, spec: TaskSpec, splits: Sequence[Split]):
        """Per column: the value (numeric) or the category (categorical) of the raw rows, and the output features."""
        from edgekit.drift_reference import reference_from_splits

        return reference_from_splits(model_path, spec, splits, table=spec.table)


TASK = TabularClassification()
