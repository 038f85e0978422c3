"""Time-series classification: labelled windows of sensor channels in, a small 1D CNN out, raw windows on the device.

Data: ``edgekit.tasks.timeseries_data`` (UCR/UEA ``.ts`` or ``.npz``), float32
``[n, channels, steps]``. Model: ``builtin:cnn1d``, a fully convolutional
network in the style of Wang et al. (2017): Conv1d → BatchNorm1d → ReLU
stages with "same" padding, global average pooling over time, one Linear.
The per-channel mean and standard deviation of the training series are
buffers of the model, so normalisation is inside the ONNX graph and the device
sends raw windows. It trains from scratch in the load pass (``train:``
settings) and further in the finetune pass (``method: full``), in the one
training loop. The bundle is a plain tensor model: input ``series``
``[batch, channels, steps]`` FP32, output ``logits``; quantization is static
QDQ (convolutions). The drift reference holds each channel's mean and std of
the raw windows (``device_agent.features.tensor_features``, the device's own
code) and the output features. Not yet: pruning, spectral drift features,
unequal lengths and missing values.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, ConfigDict

from edgekit.config import BuildConfig, FinetuneSection, PruneSection, SearchRange, TrainSection
from edgekit.data import Split, TaskData
from edgekit.search_space import Dimension
from edgekit.errors import EdgekitError
from edgekit.tasks.scratch_training import PREDICT_BATCH, train_classifier

if TYPE_CHECKING:
    import torch

    from edgekit.artifact import Artifact, PassContext, TaskSpec

KIND = "timeseries-classification"
INPUT_NAME = "series"
CNN1D = "builtin:cnn1d"
RECORD_FILE = "series_model.json"
WEIGHTS_FILE = "model.pt"
DEFAULT_WIDTHS = [32, 64, 64]
KERNELS = [7, 5, 3]  # per stage; later stages reuse the last


# What a search may tune for models trained here from scratch (the train section), and pruning on request.
SEARCH_SPACE = (
    Dimension("train.learning_rate", SearchRange(low=5e-4, high=5e-3, log=True)),
    Dimension("train.epochs", SearchRange(low=3, high=10, integer=True)),
    Dimension("train.batch_size", [32, 64, 128]),
    Dimension("train.weight_decay", SearchRange(low=0.0, high=5e-4)),
    Dimension("model.widths", [[32, 64, 64], [64, 128, 128]], searched=False),
    Dimension("prune.ratio", SearchRange(low=0.1, high=0.5), searched=False),
)


class SeriesSettings(BaseModel):
    """What a time-series build's config says about the task (part of the cache key of the passes that train)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    train: TrainSection
    widths: list[int] | None


@dataclass(frozen=True)
class SeriesModelRecord:
    """Enough to rebuild the module before loading its weights."""

    source: str
    channels: int
    steps: int
    classes: int
    widths: list[int]
    mean: list[float]  # per channel, of the training series
    std: list[float]


def build_model(record: SeriesModelRecord) -> torch.nn.Module:
    """The 1D CNN of ``record``, freshly initialised, normalising its input with the record's channel statistics."""
    import torch
    from torch import nn

    class SeriesCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.tensor(record.mean, dtype=torch.float32).view(1, -1, 1))
            self.register_buffer("std", torch.tensor(record.std, dtype=torch.float32).view(1, -1, 1))
            layers: list[nn.Module] = []
            previous = record.channels
            for stage, width in enumerate(record.widths):
                kernel = KERNELS[min(stage, len(KERNELS) - 1)]
                layers += [nn.Conv1d(previous, width, kernel, padding=kernel // 2, bias=False), nn.BatchNorm1d(width), nn.ReLU()]
                previous = width
            self.features = nn.Sequential(*layers)
            self.classifier = nn.Linear(previous, record.classes)

        def forward(self, series: torch.Tensor) -> torch.Tensor:
            return self.classifier(self.features((series - self.mean) / self.std).mean(dim=-1))

    return SeriesCNN()


def save_model(model: torch.nn.Module, record: SeriesModelRecord, folder: Path) -> None:
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    (folder / RECORD_FILE).write_text(json.dumps(asdict(record), indent=2) + "\n")
    torch.save(model.state_dict(), folder / WEIGHTS_FILE)


def load_model(folder: Path) -> tuple[torch.nn.Module, SeriesModelRecord]:
    import torch

    record = SeriesModelRecord(**json.loads((folder / RECORD_FILE).read_text()))
    model = build_model(record)
    model.load_state_dict(torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True))
    return model.eval(), record


class TimeSeriesClassification:
    """The time-series task: see the module docstring."""

    kind = KIND
    bundle_kind = "tensor"  # the device takes raw windows as an FP32 tensor
    graph_fusion = None
    builtin_sources = (CNN1D,)
    definitions = Path(__file__)
    search_space = SEARCH_SPACE
    search_starts: tuple[dict, ...] = ()
    quantization_aware_schemes: tuple[str, ...] = ()  # 1D CNNs quantize by static QDQ, which edgekit.fake_quant does not emulate yet

    def settings(self, config: BuildConfig) -> SeriesSettings:
        return SeriesSettings(train=config.train, widths=config.model.widths)

    def config_problems(self, config: BuildConfig) -> list[str]:
        problems = []
        if config.model.source not in self.builtin_sources:
            problems.append(f"model.source {config.model.source!r} is not a time-series model; {KIND} takes "
                            f"{', '.join(self.builtin_sources)}")
        if config.finetune.enabled and config.finetune.method == "lora":
            problems.append("finetune.method lora adapts Hugging Face text models; time-series models are fine-tuned fully: "
                            "set finetune.method: full")
        return problems

    def load_data(self, config: BuildConfig) -> TaskData:
        from edgekit.tasks.timeseries_data import load_task_data, load_windowed

        if config.task.window is not None:
            return load_windowed(config.data.path, config.task.window, config.data.label_column)
        return load_task_data(config.data.path, config.data.test_path)

    def spec(self, labels: tuple[str, ...]) -> TaskSpec:
        from edgekit.artifact import TaskSpec

        return TaskSpec(KIND, labels, 0, None, (INPUT_NAME,), "logits", None)

    def load(self, source: str, digest: str, settings: SeriesSettings, ctx: PassContext) -> Artifact:
        """Build the 1D CNN with the training series' channel statistics and train it from scratch."""
        import torch

        from edgekit.artifact import Artifact, Stage
        from edgekit.results import LoadResult, PassResults
        from edgekit.tasks.timeseries_data import channel_statistics

        if source != CNN1D:
            raise EdgekitError(f"model.source {source!r} is not a time-series model; {KIND} takes {CNN1D}")
        train = ctx.data.train
        mean, std = channel_statistics(train.inputs)
        record = SeriesModelRecord(source, train.inputs.shape[1], train.inputs.shape[2], len(ctx.data.labels),
                                   list(settings.widths or DEFAULT_WIDTHS), mean, std)
        torch.manual_seed(settings.train.seed)
        model = build_model(record)
        spec = self.spec(ctx.data.labels)
        metrics = train_classifier(model, ctx, settings.train, "train", keep_initial=False, input_name=INPUT_NAME,
                                   train_x=ctx.data.train.inputs, val_x=ctx.data.val.inputs)
        save_model(model, record, ctx.work_dir)
        parameters = sum(p.numel() for p in model.parameters())
        ctx.say(f"trained {source} ({parameters / 1e3:.1f} k parameters): validation accuracy {metrics['val_accuracy']:.4f}")
        return Artifact(Stage.TORCH, ctx.work_dir, ".", digest, spec,
                        results=PassResults(load=LoadResult(model=source, parameters=parameters, widths=record.widths, **metrics)))

    def finetune(self, artifact: Artifact, settings: FinetuneSection, task_settings: SeriesSettings, ctx: PassContext) -> Artifact:
        """Every weight trained further with the finetune settings; the loaded model competes."""
        from edgekit.artifact import Artifact, Stage
        from edgekit.results import FinetuneResult

        model, record = load_model(artifact.directory)
        train = TrainSection(epochs=settings.epochs, batch_size=settings.batch_size, learning_rate=settings.learning_rate,
                             weight_decay=settings.weight_decay, warmup_ratio=settings.warmup_ratio,
                             early_stopping_patience=settings.early_stopping_patience, max_train_rows=settings.max_train_rows,
                             seed=settings.seed)
        metrics = train_classifier(model, ctx, train, "finetune", keep_initial=True, input_name=INPUT_NAME,
                                   train_x=ctx.data.train.inputs, val_x=ctx.data.val.inputs)
        save_model(model, record, ctx.work_dir)
        return Artifact(Stage.TORCH, ctx.work_dir, ".", artifact.digest, artifact.task,
                        results=artifact.recording(finetune=FinetuneResult(method="full", **metrics)))

    def prune(self, artifact: Artifact, settings: PruneSection, task_settings: SeriesSettings, ctx: PassContext) -> Artifact:
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
            yield {INPUT_NAME: torch.from_numpy(np.ascontiguousarray(split.inputs[start:start + batch_size]))}

    def export_onnx(self, folder: Path, output: Path, opset: int, say) -> None:
        """torch.onnx (TorchScript exporter; BatchNorm folded, symbolic batch), checked by onnx.checker."""
        import warnings

        import onnx
        import torch

        model, record = load_model(folder)
        say(f"exporting to ONNX (opset {opset}) with torch.onnx")
        example = torch.zeros(1, record.channels, record.steps)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice says nothing about this model
            torch.onnx.export(model, (example,), str(output), input_names=[INPUT_NAME], output_names=["logits"],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, "logits": {0: "batch"}}, opset_version=opset, dynamo=False)
        onnx.checker.check_model(str(output))

    def feeds(self, spec: TaskSpec, inputs, *, pad_to_max_length: bool = False) -> dict[str, np.ndarray]:
        """Raw windows ``[n, channels, steps]`` as FP32: normalisation is inside the model."""
        return {INPUT_NAME: np.ascontiguousarray(inputs, dtype=np.float32)}

    def bundle_preprocessing(self, spec: TaskSpec):
        from device_agent.bundle import NoPreprocessing

        return NoPreprocessing()

    def bundle_files(self, spec: TaskSpec) -> dict[str, Path]:
        return {}

    def input_shape(self, spec: TaskSpec) -> dict:
        return {}

    def drift_reference(self, model_path: Path, spec: TaskSpec, splits: Sequence[Split]):
        """Per-channel mean and std of the raw windows and the output features: what the device computes for a tensor model."""
        from edgekit.drift_reference import reference_from_splits

        return reference_from_splits(model_path, spec, splits, tensor_input=INPUT_NAME)


TASK = TimeSeriesClassification()
