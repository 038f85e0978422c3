"""Time-series classification: labelled windows of sensor channels in, a small model out, raw windows on the device.

Data: ``edgekit.tasks.timeseries_data`` (UCR/UEA ``.ts``, ``.npz``, CSV, or
windows cut from a recording), float32 ``[n, channels, steps]``. Models
(``edgekit.tasks.series_models``):

- ``builtin:cnn1d``: a fully convolutional network in the style of Wang et al.
  (2017): Conv1d → BatchNorm1d → ReLU stages, global average pooling, one Linear;
  every weight trains.
- ``builtin:minirocket``: MiniRocket (Dempster, Schmidt & Webb, KDD 2021): 84
  fixed kernels at exponentially spaced dilations, biases from quantiles of
  their outputs on training series, about 10,000 PPV features; only the linear
  head on them trains (logistic regression by cross-entropy; the paper fits a
  ridge classifier), on features computed once.
- ``builtin:spectral-mlp``: an MLP on per-channel statistics and band energies
  (``device_agent.preprocess.spectral_features``), which the device computes
  from raw windows as the build did (the bundle's ``SpectralPreprocessing``).

The first two normalise each channel inside the ONNX graph. All train from
scratch in the load pass (``train:`` settings) and further in the finetune pass
(``method: full``), in the one training loop. The bundle takes raw windows:
input ``series`` ``[batch, channels, steps]`` FP32 (a spectral model's ONNX
input is ``features``, which the agent computes from ``series``), output
``logits``. Quantization: static QDQ for the convolutional graphs, with every
node a comparison reads kept in float (MiniRocket's convolutions against their
biases: a quantization step near a bias flips the answer), so only MiniRocket's
head is int8; dynamic int8 for the MLP. The drift reference holds each
channel's mean and std of the raw windows (``device_agent.features.tensor_features``,
the device's own code) and the output features. Not yet: pruning.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, ConfigDict

from edgekit.config import BuildConfig, FinetuneSection, PruneSection, SearchRange, TrainSection
from edgekit.data import Split, TaskData
from edgekit.search_space import Dimension
from edgekit.errors import EdgekitError
from device_agent import preprocess
from edgekit.tasks import series_models
from edgekit.tasks.model_folder import export_with_torch_onnx, finetune_as_train
from edgekit.tasks.scratch_training import PREDICT_BATCH, train_classifier
from edgekit.tasks.series_models import (DEFAULT_WIDTHS, KNOWN_SOURCES, SPECTRAL_BANDS, SPECTRAL_MLP, SeriesModelRecord,
                                          load_model, new_model, save_model, trainable_part)

if TYPE_CHECKING:
    import torch

    from edgekit.artifact import Artifact, PassContext, TaskSpec

KIND = "timeseries-classification"
INPUT_NAME = "series"


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


class TimeSeriesClassification:
    """The time-series task: see the module docstring."""

    kind = KIND
    bundle_kind = "tensor"  # the device takes raw windows as an FP32 tensor
    graph_fusion = None
    builtin_sources = KNOWN_SOURCES
    onnx_sources: tuple[str, ...] = ()
    definitions = (Path(series_models.__file__), Path(preprocess.__file__))  # the models and the spectral features
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
        elif problem := series_models.widths_problem(config.model.source, config.model.widths):
            problems.append(problem)
        if config.finetune.enabled and config.finetune.method == "lora":
            problems.append("finetune.method lora adapts Hugging Face text models; time-series models are fine-tuned fully: "
                            "set finetune.method: full")
        return problems

    def load_data(self, config: BuildConfig) -> TaskData:
        from edgekit.tasks.timeseries_data import load_task_data, load_windowed

        if config.task.window is not None:
            return load_windowed(config.data.path, config.task.window, config.data.label_column)
        return load_task_data(config.data.path, config.data.test_path, label_column=config.data.label_column,
                              series_length=config.task.series_length, series_format=config.task.series_format)

    def spec(self, labels: tuple[str, ...], record: SeriesModelRecord) -> TaskSpec:
        from device_agent.bundle import FEATURES_INPUT
        from edgekit.artifact import TaskSpec

        spectral = record.spectral()
        return TaskSpec(KIND, labels, 0, None, (FEATURES_INPUT if spectral else INPUT_NAME,), "logits", spectral=spectral)

    def load(self, source: str, digest: str, settings: SeriesSettings, ctx: PassContext) -> Artifact:
        """Build the model with the training series' channel statistics (MiniRocket: fit its kernels) and train it."""
        from edgekit.artifact import Artifact, Stage
        from edgekit.results import LoadResult, PassResults
        from edgekit.tasks.timeseries_data import channel_statistics

        if source not in KNOWN_SOURCES:
            raise EdgekitError(f"model.source {source!r} is not a time-series model; {KIND} takes {', '.join(KNOWN_SOURCES)}")
        train = ctx.data.train
        mean, std = channel_statistics(train.inputs)
        steps = train.inputs.shape[2]
        record = SeriesModelRecord(source, train.inputs.shape[1], steps, len(ctx.data.labels),
                                   list(settings.widths or DEFAULT_WIDTHS[source]), mean, std,
                                   bands=min(SPECTRAL_BANDS, steps // 2) if source == SPECTRAL_MLP else 0)
        model = new_model(record, train.inputs, settings.train.seed)
        trained, train_x, val_x = trainable_part(model, record, train.inputs, ctx.data.val.inputs)
        metrics = train_classifier(trained, ctx, settings.train, "train", keep_initial=False, input_name=INPUT_NAME,
                                   train_x=train_x, val_x=val_x)
        save_model(model, record, ctx.work_dir)
        parameters = sum(p.numel() for p in model.parameters())
        ctx.say(f"trained {source} ({parameters / 1e3:.1f} k parameters): validation accuracy {metrics['val_accuracy']:.4f}")
        return Artifact(Stage.TORCH, ctx.work_dir, ".", digest, self.spec(ctx.data.labels, record),
                        results=PassResults(load=LoadResult(model=source, parameters=parameters, widths=record.widths, **metrics)))

    def finetune(self, artifact: Artifact, settings: FinetuneSection, task_settings: SeriesSettings, ctx: PassContext) -> Artifact:
        """Every trainable weight (MiniRocket: its head) trained further with the finetune settings; the loaded model competes."""
        from edgekit.artifact import Artifact, Stage
        from edgekit.results import FinetuneResult

        model, record = load_model(artifact.directory)
        train = finetune_as_train(settings)
        trained, train_x, val_x = trainable_part(model, record, ctx.data.train.inputs, ctx.data.val.inputs)
        metrics = train_classifier(trained, ctx, train, "finetune", keep_initial=True, input_name=INPUT_NAME,
                                   train_x=train_x, val_x=val_x)
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
        return model(next(iter(inputs.values())))  # the one input: raw windows, or a spectral model's features

    def torch_batches(self, spec: TaskSpec, split: Split, batch_size: int = PREDICT_BATCH) -> Iterator[dict[str, torch.Tensor]]:
        import torch

        for start in range(0, len(split), batch_size):
            feeds = self.feeds(spec, split.inputs[start:start + batch_size])
            yield {name: torch.from_numpy(value) for name, value in feeds.items()}

    def export_onnx(self, folder: Path, output: Path, opset: int, say) -> None:
        import torch

        from device_agent.bundle import FEATURES_INPUT

        model, record = load_model(folder)
        spectral = record.spectral()
        example = torch.zeros(1, spectral.width) if spectral else torch.zeros(1, record.channels, record.steps)
        export_with_torch_onnx(model, example, output, FEATURES_INPUT if spectral else INPUT_NAME, ["logits"], opset, say)

    def feeds(self, spec: TaskSpec, inputs, *, pad_to_max_length: bool = False) -> dict[str, np.ndarray]:
        """Raw windows ``[n, channels, steps]`` as FP32 (normalisation is inside the model), or for a spectral model
        their features, computed as the device computes them."""
        windows = np.ascontiguousarray(inputs, dtype=np.float32)
        if spec.spectral is not None:
            from device_agent.bundle import FEATURES_INPUT
            from device_agent.preprocess import spectral_features

            return {FEATURES_INPUT: spectral_features(windows, spec.spectral.bands)}
        return {INPUT_NAME: windows}

    def bundle_preprocessing(self, spec: TaskSpec):
        from device_agent.bundle import NoPreprocessing

        return spec.spectral or NoPreprocessing()

    def bundle_files(self, spec: TaskSpec) -> dict[str, Path]:
        return {}

    def input_shape(self, spec: TaskSpec) -> dict:
        return {}

    def drift_reference(self, model_path: Path, spec: TaskSpec, splits: Sequence[Split]):
        """Per-channel mean and std of the raw windows and the output features: what the device computes for a tensor model."""
        from edgekit.drift_reference import reference_from_splits

        if spec.spectral is not None:
            return reference_from_splits(model_path, spec, splits, spectral=spec.spectral)
        return reference_from_splits(model_path, spec, splits, tensor_input=INPUT_NAME)


TASK = TimeSeriesClassification()
