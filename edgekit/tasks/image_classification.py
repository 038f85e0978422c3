"""Image classification: labelled images in, a trained classifier out, preprocessing shared with the device.

Data comes from ``edgekit.tasks.image_data`` (class folders or IDX files, raw
uint8 images). Models come from ``edgekit.tasks.image_models`` (the small CNN,
Hugging Face ResNet / MobileNetV2 from a config, or an image model folder):
each maps preprocessed ``pixel_values`` to logits, so one exporter and one
parity check serve them all.

Training (from scratch in the load pass, full fine-tuning in the finetune pass,
recovery after pruning) runs in ``edgekit.training.fit``: AdamW, linear warm-up
then cosine decay, early stopping on validation accuracy with the best epoch
kept, a checkpoint per epoch that an interrupted build resumes from, CUDA with
bf16 autocast when present. Batches are augmented on the raw uint8 images
(``train.augment``). Before training starts, the memory one step needs is
compared with what the device has free. Quantization is static QDQ on every
target: ONNX Runtime's dynamic int8 has no int8 convolutions.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, ConfigDict

from edgekit.config import BuildConfig, FinetuneSection, ImageSection, PruneSection, SearchRange, TrainSection
from edgekit.data import Split, TaskData
from edgekit.search_space import Dimension
from edgekit.tasks import image_models
from edgekit.tasks.image_data import INPUT_NAME, channels_of, load_task_data, preprocessing

if TYPE_CHECKING:
    import torch

    from edgekit.artifact import Artifact, PassContext, TaskSpec

KIND = "image-classification"
PREDICT_BATCH = 256


# What a search may tune for models trained here from scratch (the train section), and pruning on request.
SEARCH_SPACE = (
    Dimension("train.learning_rate", SearchRange(low=5e-4, high=5e-3, log=True)),
    Dimension("train.epochs", SearchRange(low=3, high=10, integer=True)),
    Dimension("train.batch_size", [32, 64, 128]),
    Dimension("train.weight_decay", SearchRange(low=0.0, high=5e-4)),
    Dimension("train.augment", ["none", "flip", "flip+shift"]),
    Dimension("model.widths", [[16, 32, 64, 128], [32, 64, 128, 256]], searched=False),
    Dimension("prune.ratio", SearchRange(low=0.1, high=0.5), searched=False),
)


class ImageSettings(BaseModel):
    """What an image build's config says about the task (part of the cache key of every pass that trains or exports)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    preprocessing: ImageSection
    train: TrainSection
    widths: list[int] | None


class ImageClassification:
    """The image task: see the module docstring."""

    kind = KIND
    bundle_kind = KIND
    graph_fusion = None  # Conv+BN folding is the exporter's and ONNX Runtime's own
    builtin_sources = image_models.KNOWN_SOURCES
    onnx_sources: tuple[str, ...] = ()
    definitions = (Path(image_models.__file__),)
    search_space = SEARCH_SPACE
    search_starts: tuple[dict, ...] = ()
    quantization_aware_schemes: tuple[str, ...] = ()  # CNNs quantize by static QDQ, which edgekit.fake_quant does not emulate yet

    def settings(self, config: BuildConfig) -> ImageSettings:
        return ImageSettings(preprocessing=config.task.image, train=config.train, widths=config.model.widths)

    def config_problems(self, config: BuildConfig) -> list[str]:
        source, problems = config.model.source, []
        if source.startswith("embedded:") or source.endswith(".onnx"):
            problems.append(f"model.source {source!r} is a text model; {KIND} takes {', '.join(self.builtin_sources)} "
                            "or a Hugging Face image model folder")
        if config.finetune.enabled and config.finetune.method == "lora":
            problems.append("finetune.method lora adapts Hugging Face text models; image models are fine-tuned fully: "
                            "set finetune.method: full")
        return problems

    def load_data(self, config: BuildConfig) -> TaskData:
        return load_task_data(config.data, config.task.image)

    # ------------------------------------------------------------------ the torch stage

    def load(self, source: str, digest: str, settings: ImageSettings, ctx: PassContext) -> Artifact:
        """Build the image model and train it on the build's images (from scratch unless a folder brought weights)."""
        from edgekit.artifact import Artifact, Stage
        from edgekit.config import BUILT_HERE_PREFIXES
        from edgekit.results import LoadResult, PassResults
        from edgekit.passes.load import resolve_source
        from edgekit.tasks import image_models

        section, train = settings.preprocessing, settings.train
        source = source if source.startswith(BUILT_HERE_PREFIXES) else str(resolve_source(source))
        record = image_models.record_for(source, channels_of(section), len(ctx.data.labels), settings.widths, section.size)
        model = image_models.build(record)
        spec = task_spec(ctx.data.labels, section)
        loop = LoopSettings(train.epochs, train.batch_size, train.learning_rate, train.weight_decay, train.warmup_ratio,
                            train.early_stopping_patience, train.seed, train.max_train_rows, train.augment)
        metrics = train_model(model, ctx.data, spec, loop, ctx, "train", keep_initial=False)
        parameters = sum(p.numel() for p in model.parameters())
        ctx.say(f"trained {record.source} ({parameters / 1e6:.2f} M parameters): validation accuracy {metrics['val_accuracy']:.4f} "
                f"after {metrics['epochs_run']} epoch(s), {metrics['seconds']:.0f} s")
        image_models.save(model, record, ctx.work_dir)
        return Artifact(Stage.TORCH, ctx.work_dir, ".", digest, spec,
                        results=PassResults(load=LoadResult(model=record.source, parameters=parameters, widths=record.widths, **metrics)))

    def finetune(self, artifact: Artifact, settings: FinetuneSection, task_settings: ImageSettings, ctx: PassContext) -> Artifact:
        """Every weight trained further on the build's images (augmented as in training); the loaded model competes."""
        from edgekit.artifact import Artifact, Stage
        from edgekit.results import FinetuneResult
        from edgekit.tasks import image_models

        model, record = image_models.load(artifact.directory)
        loop = LoopSettings(settings.epochs, settings.batch_size, settings.learning_rate, settings.weight_decay, settings.warmup_ratio,
                            settings.early_stopping_patience, settings.seed, settings.max_train_rows, task_settings.train.augment)
        metrics = train_model(model, ctx.data, artifact.task, loop, ctx, "finetune", keep_initial=True)
        ctx.say(f"finetune: validation accuracy {metrics['val_accuracy']:.4f} (before: {metrics['val_accuracy_before']:.4f})")
        image_models.save(model, record, ctx.work_dir)
        return Artifact(Stage.TORCH, ctx.work_dir, ".", artifact.digest, artifact.task,
                        results=artifact.recording(finetune=FinetuneResult(method="full", **metrics)))

    def prune(self, artifact: Artifact, settings: PruneSection, task_settings: ImageSettings, ctx: PassContext) -> Artifact:
        from edgekit.pruning.cnn import prune_cnn

        return prune_cnn(artifact, settings, task_settings, ctx)

    def save_torch(self, model: torch.nn.Module, source: Path, folder: Path) -> None:
        from edgekit.tasks import image_models

        image_models.save(model, image_models.load(source)[1], folder)

    def load_torch(self, folder: Path) -> torch.nn.Module:
        from edgekit.tasks import image_models

        return image_models.load(folder)[0]

    @staticmethod
    def forward(model: torch.nn.Module, inputs) -> torch.Tensor:
        return model(inputs[INPUT_NAME])

    def torch_batches(self, spec: TaskSpec, split: Split, batch_size: int = PREDICT_BATCH) -> Iterator[dict[str, torch.Tensor]]:
        """The split's images as model inputs, in order."""
        import torch

        for start in range(0, len(split), batch_size):
            yield {INPUT_NAME: torch.from_numpy(self.feeds(spec, split.inputs[start:start + batch_size])[INPUT_NAME])}

    # ------------------------------------------------------------------ ONNX and the device

    def export_onnx(self, folder: Path, output: Path, opset: int, say) -> None:
        """torch.onnx (BatchNorm folded, symbolic batch), checked by onnx.checker."""
        import onnx

        from edgekit.tasks import image_models

        model, record = image_models.load(folder)
        say(f"exporting to ONNX (opset {opset}) with torch.onnx")
        image_models.export_onnx(model, record, INPUT_NAME, output, opset)
        onnx.checker.check_model(str(output))

    def feeds(self, spec: TaskSpec, inputs: np.ndarray, *, pad_to_max_length: bool = False) -> dict[str, np.ndarray]:
        """The device's ``ImagePreprocessor`` on uint8 images ``[n, height, width, channels]`` (their shape is fixed already)."""
        from device_agent.preprocess import ImagePreprocessor

        if spec.image is None:
            raise ValueError("an image task needs its image preprocessing")
        return {INPUT_NAME: ImagePreprocessor(spec.image)(np.asarray(inputs))}


    def bundle_preprocessing(self, spec: TaskSpec):
        return spec.image

    def bundle_files(self, spec: TaskSpec) -> dict[str, Path]:
        return {}

    def input_shape(self, spec: TaskSpec) -> dict:
        return {"image_size": list(spec.image.crop)}

    def drift_reference(self, model_path: Path, spec: TaskSpec, splits: Sequence[Split]):
        from edgekit.drift_reference import reference_from_splits

        return reference_from_splits(model_path, spec, splits)


TASK = ImageClassification()


def task_spec(labels: tuple[str, ...], section: ImageSection) -> TaskSpec:
    from edgekit.artifact import TaskSpec

    return TaskSpec(KIND, labels, 0, None, (INPUT_NAME,), "logits", preprocessing(section))


# ---------------------------------------------------------------- training


@dataclass(frozen=True)
class LoopSettings:
    """One training run's hyper-parameters (from the train section, or the finetune section for fine-tuning)."""

    epochs: int
    batch_size: int
    learning_rate: float
    weight_decay: float
    warmup_ratio: float
    patience: int
    seed: int
    max_train_rows: int | None = None
    augment: str = "flip"  # none | flip | flip+shift


def step_bytes(model: torch.nn.Module, batch: int, channels: int, size: tuple[int, int]) -> int:
    """Memory of one training step: activations kept for backward (measured by one forward of a single image) x batch x 3
    (the activation, its gradient, the allocator's slack), plus weights, gradients and two AdamW moments."""
    import torch

    elements = 0

    def count(_module, _inputs, output) -> None:
        nonlocal elements
        if isinstance(output, torch.Tensor):
            elements += output.numel()

    leaves = [m for m in model.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(count) for m in leaves]
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, channels, *size))
        model.train(was_training)
    finally:
        for hook in hooks:
            hook.remove()
    parameters = sum(p.numel() for p in model.parameters())
    return (batch * (elements + channels * size[0] * size[1]) * 3 + parameters * 4) * 4


def check_memory(model: torch.nn.Module, batch: int, channels: int, size: tuple[int, int], device: str, setting: str) -> None:
    """A clear error, before any training, when one step at this batch size cannot fit in the device's free memory."""
    from edgekit.memory import USABLE_SHARE, available_bytes, check_fits

    fixed = step_bytes(model, 0, channels, size)
    per_image = max(1, step_bytes(model, 1, channels, size) - fixed)
    largest = max(1, int((USABLE_SHARE * available_bytes(device) - fixed) // per_image))
    check_fits(step_bytes(model, batch, channels, size), device, f"{setting} {batch} with {channels}x{size[0]}x{size[1]} images",
               f"set {setting} to {largest} or less")


def _augment(images: np.ndarray, rng: np.random.Generator, shift: bool) -> np.ndarray:
    """Random horizontal flips and (``shift``) shifts of up to 2 pixels (edges repeated), on the raw uint8 images."""
    flipped = np.where(rng.random(len(images))[:, None, None, None] < 0.5, images[:, :, ::-1], images)
    if not shift:
        return flipped
    padded = np.pad(flipped, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="edge")
    height, width = images.shape[1:3]
    out = np.empty_like(images)
    for row, (dy, dx) in enumerate(rng.integers(0, 5, size=(len(images), 2))):
        out[row] = padded[row, dy : dy + height, dx : dx + width]
    return out


def accuracy(model: torch.nn.Module, split: Split, spec: TaskSpec) -> float:
    from edgekit import training
    from edgekit.measure import classification_metrics

    logits = training.predict(model, TASK.torch_batches(spec, split), TASK.forward)
    return classification_metrics(split.labels, logits.argmax(-1), spec.labels).accuracy


def train_model(model: torch.nn.Module, data: TaskData, spec: TaskSpec, settings: LoopSettings, ctx: PassContext, what: str,
                keep_initial: bool) -> dict:
    """Train ``model`` in place on train, judged on val each epoch; the best epoch's weights are left in the model.

    ``keep_initial``: the starting weights compete too (fine-tuning keeps the
    loaded model when no epoch beats it). Resumes from ``ctx.checkpoint_dir``.
    Returns the run's metrics (accuracies, epochs, seconds, samples/s, loss curve).
    """
    import torch

    from edgekit import training
    from edgekit.checkpoints import Checkpoints

    train_split = data.train.head(settings.max_train_rows) if settings.max_train_rows else data.train
    channels, size = (1 if spec.image.channel_order == "L" else 3), tuple(spec.image.crop)
    torch.manual_seed(settings.seed)
    steps_per_epoch = math.ceil(len(train_split) / settings.batch_size)
    batches = training.Shuffled(len(train_split), settings.batch_size, settings.seed, _batch_maker(spec, train_split, settings),
                                reseed_each_epoch=True)
    fit_settings = training.FitSettings(settings.epochs, settings.learning_rate, settings.weight_decay, "cosine",
                                        int(settings.warmup_ratio * steps_per_epoch * settings.epochs), settings.patience, label=what)
    result = training.fit(
        model, batches, training.cross_entropy(TASK.forward), fit_settings, progress=ctx.progress, say=ctx.say,
        validate=lambda m: accuracy(m, data.val, spec), initial=(lambda m: (accuracy(m, data.val, spec), {})) if keep_initial else None,
        checkpoints=Checkpoints(ctx.checkpoint_dir), on_epoch=ctx.on_epoch,
        memory_check=lambda device: check_memory(model, settings.batch_size, channels, size, device, f"{what}.batch_size"))
    return {
        "device": result.device, "val_accuracy": result.best_score, "val_accuracy_before": result.initial_score,
        "best_epoch": result.best_epoch, "epochs_run": result.epochs_run, "seconds": round(result.seconds, 2),
        "samples_per_second": round(result.samples_per_second, 1) if result.samples_per_second else None,
        "loss_curve": result.loss_curve(steps_per_epoch),
        "kept": "trained" if result.improved else "the starting weights (no epoch beat them on validation)",
    }


def _batch_maker(spec: TaskSpec, split: Split, settings: LoopSettings):
    """Rows → an augmented, preprocessed batch; augmentation draws from a generator seeded per epoch (resumable)."""
    import torch

    from edgekit import training

    generators: dict[int, np.random.Generator] = {}

    def make(rows: np.ndarray, epoch: int) -> training.Batch:
        images = split.inputs[rows]
        if settings.augment != "none":
            rng = generators.setdefault(epoch, np.random.default_rng(settings.seed * 1000 + epoch))
            images = _augment(images, rng, shift=settings.augment == "flip+shift")
        pixels = torch.from_numpy(TASK.feeds(spec, images)[INPUT_NAME])
        return training.Batch({INPUT_NAME: pixels}, torch.from_numpy(split.labels[rows]))

    return make
