"""Text classification: labelled texts in, a Hugging Face sequence classifier out, tokenized as the device tokenizes.

Data: rows with a text, a label and (optionally) a split, read by
``edgekit.tasks.text_data`` from CSV/TSV, JSONL, Parquet or a Hugging Face
``save_to_disk`` folder, cleaned and split; calibration rows come from their own
file or, without one, from train. Tokenization is
``device_agent.preprocess.TextTokenizer``: the same code a device runs.

Models: the embedded all-MiniLM-L6-v2 or a Hugging Face folder, read by mean
pooling or [CLS] as the encoder was trained (``edgekit.tasks.text_models``).
The load step fits the head on the frozen encoder's features; the finetune step
trains LoRA adapters (peft) or every weight; prune removes attention heads and
FFN neurons (``edgekit.pruning.encoder``). All training runs in
``edgekit.training.fit``. Export is PyTorch's TorchScript exporter (the one
optimum runs for BERT), from the model as trained, with the dynamic axes named
``batch`` and ``sequence``.
"""

from __future__ import annotations

import functools
import inspect
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, ConfigDict

from edgekit.config import BuildConfig, DataSection, FinetuneSection, HeadSection, PruneSection, SearchRange
from edgekit.search_space import NO_FINETUNE, Dimension
from edgekit.data import Split, TaskData
from edgekit.tasks.text_data import load_dataset, read_rows, to_task_data
from edgekit.tasks.text_models import load_classifier, mean_pool, new_classifier, pooling_of
from edgekit.errors import EdgekitError

if TYPE_CHECKING:
    import torch

    from edgekit.artifact import Artifact, PassContext, TaskSpec

KIND = "text-classification"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
PREDICT_BATCH = 64
# Linear layers that LoRA adapts, by model family (the Hugging Face module names).
LORA_TARGETS = {
    "bert": ("query", "key", "value", "dense"),
    "distilbert": ("q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"),
    "roberta": ("query", "key", "value", "dense"),
}

_TUNED = ("finetune.method", ("lora", "full"))
# What a text search may tune. Ranges: full fine-tuning of BERT-size encoders lives at 1e-5..1e-4 (the common recipe
# is 2e-5..5e-5); LoRA adapters need about ten times more; a freshly fitted head learns at about 1e-3.
SEARCH_SPACE = (
    Dimension("finetune.method", [NO_FINETUNE, "lora", "full"]),
    Dimension("finetune.learning_rate", SearchRange(low=1.5e-5, high=1.2e-4, log=True), when=("finetune.method", ("full",))),
    Dimension("finetune.learning_rate", SearchRange(low=2e-4, high=2e-3, log=True), when=("finetune.method", ("lora",))),
    Dimension("finetune.head_learning_rate", SearchRange(low=3e-4, high=3e-3, log=True), when=_TUNED),
    Dimension("finetune.epochs", SearchRange(low=2, high=5, integer=True), when=_TUNED),
    Dimension("finetune.batch_size", [16, 32], when=_TUNED),
    Dimension("finetune.warmup_ratio", SearchRange(low=0.0, high=0.15), when=_TUNED),
    Dimension("finetune.schedule", ["linear", "cosine", "constant"], when=_TUNED),
    Dimension("finetune.weight_decay", SearchRange(low=0.0, high=0.1), when=_TUNED),
    Dimension("finetune.label_smoothing", SearchRange(low=0.0, high=0.15), when=_TUNED),
    Dimension("finetune.lora_r", [8, 16, 32], when=("finetune.method", ("lora",))),
    Dimension("finetune.lora_alpha", [16, 32, 64], when=("finetune.method", ("lora",))),
    Dimension("finetune.lora_dropout", SearchRange(low=0.0, high=0.15), when=("finetune.method", ("lora",))),
    Dimension("head.learning_rate", SearchRange(low=1e-3, high=1e-2, log=True), when=("finetune.method", (NO_FINETUNE,))),
    Dimension("head.pooling", ["cls", "mean"], searched=False),  # auto reads the model's own pooling config
    Dimension("finetune.max_train_rows", SearchRange(low=200, high=100_000, integer=True, log=True), searched=False),
    Dimension("prune.ratio", SearchRange(low=0.1, high=0.5), searched=False),
)
# After the build as written, the search tries this first: plain full fine-tuning as sentence encoders are usually
# fine-tuned (a slow encoder, a fast head) at a constant rate, the recipe a careful user would write by hand. A constant
# rate, because the search keeps the best epoch anyway: on the docstrings set a linear decay over 4 epochs ended
# 2 points under the same recipe at a constant rate, which was still improving at epoch 4 (bench/README.md, Search).
SEARCH_STARTS = ({"finetune.method": "full", "finetune.learning_rate": 5e-5, "finetune.head_learning_rate": 1e-3,
                  "finetune.epochs": 5, "finetune.batch_size": 32, "finetune.warmup_ratio": 0.0, "finetune.schedule": "constant",
                  "finetune.weight_decay": 0.01, "finetune.label_smoothing": 0.0},)


class TextSettings(BaseModel):
    """What a text build's config says about the task (part of the cache key of every pass that trains or exports)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_length: int
    head: HeadSection


class TextClassification:
    """The text task: see the module docstring."""

    kind = KIND
    bundle_kind = KIND
    graph_fusion = "bert"  # ONNX Runtime's transformer fusions apply
    builtin_sources: tuple[str, ...] = ()  # Hugging Face folders, embedded:all-minilm-l6-v2 or an .onnx file
    onnx_sources: tuple[str, ...] = ()
    definitions: tuple[Path, ...] = ()
    quantization_aware_schemes = ("dynamic",)  # edgekit.fake_quant emulates dynamic int8 of BERT-style encoders
    search_space = SEARCH_SPACE
    search_starts = SEARCH_STARTS

    def settings(self, config: BuildConfig) -> TextSettings:
        return TextSettings(max_length=config.task.max_length, head=config.head)

    def config_problems(self, config: BuildConfig) -> list[str]:
        return []  # a Hugging Face folder, embedded:all-minilm-l6-v2 or an .onnx file: checked when the load pass reads it

    def load_data(self, config: BuildConfig) -> TaskData:
        return load_task_data(config.data)

    def spec(self, labels: tuple[str, ...], max_length: int, tokenizer_file: Path) -> TaskSpec:
        from edgekit.artifact import TaskSpec

        return TaskSpec(KIND, labels, max_length, tokenizer_file, INPUT_NAMES)

    # ------------------------------------------------------------------ the torch stage

    def load(self, source: str, digest: str, settings: TextSettings, ctx: PassContext) -> Artifact:
        """A Hugging Face folder with a head for the build's labels, fitted on frozen features, saved with its tokenizer."""
        from edgekit.artifact import Artifact, Stage
        from edgekit.passes.load import resolve_source
        from edgekit.results import LoadResult, PassResults

        folder = resolve_source(source)
        metrics = fit_head(folder, ctx.data, settings, ctx)
        copy_tokenizer(folder, ctx.work_dir)
        task = self.spec(ctx.data.labels, settings.max_length, tokenizer_of(ctx.work_dir))
        return Artifact(Stage.TORCH, ctx.work_dir, ".", digest, task, results=PassResults(load=LoadResult(**metrics)))

    def finetune(self, artifact: Artifact, settings: FinetuneSection, task_settings: TextSettings, ctx: PassContext) -> Artifact:
        return finetune(artifact, settings, ctx)

    def prune(self, artifact: Artifact, settings: PruneSection, task_settings: TextSettings, ctx: PassContext) -> Artifact:
        from edgekit.pruning.encoder import prune_encoder

        return prune_encoder(artifact, settings, ctx)

    def load_torch(self, folder: Path) -> torch.nn.Module:
        return load_classifier(folder).eval()

    def save_torch(self, model: torch.nn.Module, source: Path, folder: Path) -> None:
        model.save_pretrained(folder)
        copy_tokenizer(source, folder)

    @staticmethod
    def forward(model: torch.nn.Module, inputs) -> torch.Tensor:
        return model(**inputs).logits

    def torch_batches(self, spec: TaskSpec, split: Split, batch_size: int = PREDICT_BATCH) -> Iterator[dict[str, torch.Tensor]]:
        """The split's texts as model inputs, in order."""
        import torch

        for start in range(0, len(split), batch_size):
            yield {k: torch.from_numpy(v) for k, v in self.feeds(spec, split.texts[start:start + batch_size]).items()}

    # ------------------------------------------------------------------ ONNX and the device

    def export_onnx(self, folder: Path, output: Path, opset: int, say) -> None:
        """The model as trained (mean-pooled or not) through PyTorch's TorchScript exporter, as optimum exports BERT:
        the tokenizer's inputs with axes ``batch`` and ``sequence``, ``logits`` out; checked by onnx.checker."""
        import warnings

        import onnx
        import torch

        from edgekit.passes.export import ExportError

        model = self.load_torch(folder)
        names = [name for name in INPUT_NAMES if name in inspect.signature(model.forward).parameters]
        example = {name: torch.ones(1, 8, dtype=torch.int64) for name in names}
        if "token_type_ids" in example:
            example["token_type_ids"] = torch.zeros_like(example["token_type_ids"])
        say(f"exporting to ONNX (opset {opset})")
        axes = {name: {0: "batch", 1: "sequence"} for name in names} | {"logits": {0: "batch"}}

        class Logits(torch.nn.Module):  # the exporter wants tensors out, not a ModelOutput
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, *inputs):
                return self.model(**dict(zip(names, inputs, strict=True))).logits

        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer notices say nothing about this model
                torch.onnx.export(Logits().eval(), tuple(example.values()), str(output), dynamo=False, input_names=names,
                                  output_names=["logits"], dynamic_axes=axes, opset_version=opset, do_constant_folding=True)
        except (RuntimeError, ValueError, IndexError, TypeError, torch.onnx.errors.OnnxExporterError) as exc:
            raise ExportError(f"PyTorch cannot export this model to ONNX ({str(exc).splitlines()[0]}); check that its "
                              "architecture supports ONNX export") from None
        onnx.checker.check_model(onnx.load(str(output)))

    def feeds(self, spec: TaskSpec, inputs: Sequence[str], *, pad_to_max_length: bool = False) -> dict[str, np.ndarray]:
        """Every tensor the tokenizer makes (callers keep those the graph takes); ``pad_to_max_length`` for fixed-shape timing."""
        if spec.tokenizer_file is None:
            raise ValueError("a text task needs its tokenizer.json")
        return _tokenizer(Path(spec.tokenizer_file), spec.max_length, pad_to_max_length).encode(list(inputs))


    def bundle_preprocessing(self, spec: TaskSpec):
        from device_agent.bundle import TokenizerPreprocessing

        return TokenizerPreprocessing(tokenizer_file="tokenizer.json", max_length=spec.max_length)

    def bundle_files(self, spec: TaskSpec) -> dict[str, Path]:
        return {"tokenizer.json": Path(spec.tokenizer_file)}

    def input_shape(self, spec: TaskSpec) -> dict:
        return {"sequence_length": spec.max_length}

    def drift_reference(self, model_path: Path, spec: TaskSpec, splits: Sequence[Split]):
        from edgekit.drift_reference import reference_from_splits

        return reference_from_splits(model_path, spec, splits)


TASK = TextClassification()


def load_task_data(columns: DataSection) -> TaskData:
    """Read, clean and split the build's labelled texts."""
    dataset = load_dataset(columns.path, columns.text_column, columns.label_column, columns.split_column)
    calibration = None
    if columns.calibration_path is not None:
        calibration = read_rows(columns.calibration_path, columns.text_column, columns.label_column, columns.split_column)
    return to_task_data(dataset, calibration)


@functools.lru_cache(maxsize=8)
def _tokenizer(tokenizer_file: Path, max_length: int, pad_to_max_length: bool):
    # Passes encode in many small batches; reading tokenizer.json once per batch cost more than the encoding.
    from device_agent.preprocess import TextTokenizer

    return TextTokenizer(tokenizer_file, max_length, pad_to_max_length=pad_to_max_length)


def tokenizer_of(folder: Path) -> Path:
    tokenizer = folder / "tokenizer.json"
    if not tokenizer.is_file():
        raise EdgekitError(f"{folder} has no tokenizer.json (the fast tokenizer file); save the tokenizer with the model")
    return tokenizer


def copy_tokenizer(source: Path, destination: Path) -> None:
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, destination / name)


def with_tokenizer_in(artifact: Artifact, folder: Path) -> TaskSpec:
    """The artifact's task spec pointing at the tokenizer copied into ``folder``."""
    return replace(artifact.task, tokenizer_file=folder / "tokenizer.json")


# ---------------------------------------------------------------------- the head fit


def fit_head(source: Path, data: TaskData, settings: TextSettings, ctx: PassContext) -> dict:
    """Load the model with a classifier for the labels and fit it on the frozen encoder's features: mean-pooled token
    vectors (``edgekit.tasks.text_models``) or the family's [CLS] pooler + classifier."""
    import torch
    from transformers.utils import logging as hf_logging

    from edgekit import training
    from edgekit.measure import classification_metrics

    labels, head_settings = data.labels, settings.head
    hf_logging.set_verbosity_error()  # the "newly initialized head" warning is expected: we fit it next
    torch.manual_seed(head_settings.seed)
    pooling = pooling_of(source, head_settings.pooling)
    model = new_classifier(source, labels, pooling).eval()
    if not head_settings.enabled:
        model.save_pretrained(ctx.work_dir)
        return {"head": "as loaded (not fitted)", "pooling": pooling}
    spec = TASK.spec(labels, settings.max_length, tokenizer_of(source))
    train_x, val_x = (_features(model, pooling, spec, split, what, ctx) for split, what in ((data.train, "train"), (data.val, "val")))
    train_y, val_y = torch.from_numpy(data.train.labels), data.val.labels
    head = model.classifier if pooling == "mean" else _cls_head(model.base_model.pooler, model.classifier)

    def validate(module) -> float:
        return float(np.mean(training.predict(module, [{"features": val_x}], _head_forward).argmax(-1) == val_y))

    batches = training.Shuffled(len(train_x), 128, head_settings.seed,
                                lambda rows, _epoch: training.Batch({"features": train_x[rows]}, train_y[rows]))
    result = training.fit(head, batches, training.cross_entropy(_head_forward),
                          training.FitSettings(head_settings.epochs, head_settings.learning_rate, patience=10, label="fitting head"),
                          progress=ctx.progress, validate=validate)
    val_metrics = classification_metrics(val_y, training.predict(head, [{"features": val_x}], _head_forward).argmax(-1), labels)
    model.save_pretrained(ctx.work_dir)
    ctx.say(f"fitted the classification head ({pooling} pooling): validation accuracy {val_metrics.accuracy:.3f} (epoch {result.best_epoch})")
    what = "classifier on mean-pooled token vectors" if pooling == "mean" else "pooler + classifier on [CLS]"
    return {"head": f"{what}, fitted on the frozen encoder", "pooling": pooling, "val_accuracy": val_metrics.accuracy,
            "val_f1_macro": val_metrics.f1_macro, "epochs": result.best_epoch}


def _features(model, pooling: str, spec: TaskSpec, split: Split, what: str, ctx: PassContext):
    """The frozen encoder's features of every row: its [CLS] vector, or its token vectors' mean."""
    import torch

    rows = []
    task = ctx.progress.add_task(f"encoding {what}", total=len(split))
    with torch.inference_mode():
        for inputs in TASK.torch_batches(spec, split):
            hidden = model.base_model(**inputs).last_hidden_state
            rows.append(mean_pool(hidden, inputs["attention_mask"]) if pooling == "mean" else hidden[:, 0])
            ctx.progress.advance(task, len(inputs["input_ids"]))
    ctx.progress.remove_task(task)
    return torch.cat(rows)


def _cls_head(pooler, classifier):
    """The pooler and classifier of a BERT-style classifier as one module over [CLS] features (it shares their weights)."""
    import torch

    class Head(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pooler, self.classifier = pooler, classifier

        def forward(self, features):
            return self.classifier(self.pooler.activation(self.pooler.dense(features)))

    return Head()


def _head_forward(module, inputs):
    return module(inputs["features"])


# ---------------------------------------------------------------------- fine-tuning


def lora_model(model, settings: FinetuneSection):
    """The model with LoRA adapters on the family's projections (or the configured modules); head trained fully."""
    from peft import LoraConfig, TaskType, get_peft_model

    family = model.config.model_type
    targets = settings.lora_target_modules or LORA_TARGETS.get(family)
    if not targets:
        raise EdgekitError(f"no default LoRA target modules for {family!r} models; set finetune.lora_target_modules")
    available = sorted({name.rsplit(".", 1)[-1] for name, _ in model.named_modules()})
    missing = [name for name in targets if name not in available]
    if missing:
        raise EdgekitError(
            f"LoRA target modules {missing} do not exist in this {family} model; "
            f"set finetune.lora_target_modules to some of: {', '.join(available)}"
        )
    head = ["classifier", "pooler"] if getattr(model.base_model, "pooler", None) is not None else ["classifier"]
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=settings.lora_r, lora_alpha=settings.lora_alpha,
                        lora_dropout=settings.lora_dropout, target_modules=list(targets), modules_to_save=head)
    return get_peft_model(model, config)


def _memory_check(model, settings: FinetuneSection, max_length: int):
    from edgekit.memory import check_fits, transformer_step_bytes

    config = model.config
    needed = transformer_step_bytes(
        settings.batch_size, max_length, config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
        getattr(config, "intermediate_size", 4 * config.hidden_size), sum(p.numel() for p in model.parameters()),
    )
    return lambda device: check_fits(needed, device, f"finetune.batch_size {settings.batch_size} at task.max_length {max_length}",
                                     "lower finetune.batch_size or task.max_length")


def finetune(artifact: Artifact, settings: FinetuneSection, ctx: PassContext) -> Artifact:
    """LoRA or full fine-tuning from the head-fitted model; the head-only model competes on validation."""
    import math

    import torch

    from edgekit import training
    from edgekit.artifact import Artifact, Stage
    from edgekit.checkpoints import Checkpoints
    from edgekit.results import FinetuneResult

    torch.manual_seed(settings.seed)
    spec = artifact.task
    model = load_classifier(artifact.directory)
    memory_check = _memory_check(model, settings, spec.max_length)
    trainable = lora_model(model, settings) if settings.method == "lora" else model
    train = ctx.data.train.head(settings.max_train_rows) if settings.max_train_rows else ctx.data.train
    steps_per_epoch = math.ceil(len(train) / settings.batch_size)
    scores = _Scores(spec, ctx.data)
    batches = training.Shuffled(len(train), settings.batch_size, settings.seed, lambda rows, _epoch: _text_batch(spec, train, rows),
                                lengths=token_counts(spec, train))
    fit_settings = training.FitSettings(settings.epochs, settings.learning_rate, settings.weight_decay, settings.schedule,
                                        int(settings.warmup_ratio * steps_per_epoch * settings.epochs),
                                        settings.early_stopping_patience, label=f"finetune ({settings.method})")
    head_rate = settings.head_learning_rate or settings.learning_rate
    result = training.fit(trainable, batches, training.cross_entropy(TASK.forward, settings.label_smoothing), fit_settings,
                          progress=ctx.progress, say=ctx.say, validate=scores.validate, initial=scores.head_only,
                          checkpoints=Checkpoints(ctx.checkpoint_dir), memory_check=memory_check,
                          learning_rates={"classifier": head_rate, "pooler": head_rate}, on_epoch=ctx.on_epoch)
    if settings.method == "lora":
        trainable.save_pretrained(ctx.work_dir / "adapter")
        trainable = trainable.merge_and_unload()
    TASK.save_torch(trainable, artifact.directory, ctx.work_dir)
    metrics = _finetune_metrics(settings, result, steps_per_epoch)
    return Artifact(Stage.TORCH, ctx.work_dir, ".", artifact.digest, with_tokenizer_in(artifact, ctx.work_dir),
                    results=artifact.recording(finetune=FinetuneResult(**metrics)))


class _Scores:
    """Validation accuracy of the model being fine-tuned, through the prediction loop (the test split is the evaluate
    pass's alone: a search compares fine-tuning runs on validation, and test judges only the one it ships)."""

    def __init__(self, spec: TaskSpec, data: TaskData) -> None:
        self.spec, self.data = spec, data

    def validate(self, model) -> float:
        from edgekit import training

        logits = training.predict(model, TASK.torch_batches(self.spec, self.data.val), TASK.forward)
        return float(np.mean(logits.argmax(-1) == self.data.val.labels))

    def head_only(self, model) -> tuple[float, dict]:
        return self.validate(model), {}


def token_counts(spec: TaskSpec, split: Split) -> np.ndarray:
    """Each row's token count after truncation: what training groups batches by (``training.Shuffled``'s lengths)."""
    counts = [TASK.feeds(spec, split.texts[start:start + PREDICT_BATCH])["attention_mask"].sum(axis=1)
              for start in range(0, len(split), PREDICT_BATCH)]
    return np.concatenate(counts) if counts else np.zeros(0, dtype=np.int64)


def _text_batch(spec: TaskSpec, split: Split, rows: np.ndarray, teacher: np.ndarray | None = None):
    import torch

    from edgekit import training

    inputs = {k: torch.from_numpy(v) for k, v in TASK.feeds(spec, [split.texts[i] for i in rows]).items()}
    return training.Batch(inputs, torch.from_numpy(split.labels[rows]),
                          torch.from_numpy(teacher[rows]) if teacher is not None else None)


def _finetune_metrics(settings: FinetuneSection, result, steps_per_epoch: int) -> dict:
    return {
        "method": settings.method, "device": result.device, "val_accuracy_head_only": result.initial_score,
        "val_accuracy": result.best_score, "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
        "resumed_after_epoch": result.resumed_after_epoch, "seconds": result.seconds,
        "samples_per_second": result.samples_per_second, "loss_curve": result.loss_curve(steps_per_epoch),
        "kept": "fine-tuned" if result.improved else "the head-only model (fine-tuning did not beat it on validation)",
    }
