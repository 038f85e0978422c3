"""The build: a literal list of passes, planned per target, cached by content, reported.

    shared prefix (once):      load → [finetune] → [prune] → export
                               (an .onnx file: load-onnx; trees trained straight to ONNX: load-to-onnx)
    per target (suffix):       [qat] → optimize → quantize → compile → evaluate → [gates] → package

``qat`` (quantization-aware training) runs for the targets whose int8 recipe it
emulates, when the model is trained here in PyTorch (``edgekit/passes/qat.py``).

Every pass output is cached under ``<cache>/<pass>/<key>/`` where the key hashes
the input artifact's digest, the pass's options and version, the versions of
the libraries it calls, the data (for passes that read it), the target profile
(for target-specific passes) and the signing key (for the pass that signs). A
pass writes into a temporary folder that is renamed into place only when it
finished, so an interrupted build never poisons the cache. The output's digest
is its key, so keys chain: a dry run knows what is cached without running
anything. Each output stays visible from the build folder through a link
``<out>/[<target>/]passes/NN-<pass>``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

from edgekit.artifact import Artifact, Pass, PassContext, Stage, TaskSpec
from edgekit.config import BuildConfig
from edgekit.errors import EdgekitError
from edgekit.results import Gate, PassResults
from edgekit.passes import compile as compile_pass
from edgekit.passes import evaluate, export, finetune, load, optimize, package, prune, qat, quantize
from edgekit.targets import TargetProfile, load_target
from edgekit.data import TaskData

PER_TARGET: tuple[Pass, ...] = (optimize.PASS, quantize.PASS, compile_pass.PASS, evaluate.PASS, package.PASS)
ARTIFACT_FILE = "artifact.json"


def shared_prefix(config: BuildConfig) -> tuple[Pass, ...]:
    """The target-independent passes: an ONNX source, or a model trained straight to ONNX, skips the PyTorch stages;
    fine-tuning and pruning run when enabled."""
    if load.is_onnx_source(config.model.source):
        return (load.ONNX_PASS,)
    if load.trained_to_onnx(config.model.source):
        return (load.TO_ONNX_PASS,)
    optional = ((finetune.PASS,) if config.finetune.enabled else ()) + ((prune.PASS,) if config.prune.enabled else ())
    return (load.PASS, *optional, export.PASS)


def per_target(config: BuildConfig, target: TargetProfile) -> tuple[Pass, ...]:
    """The passes run for one target: quantization-aware training first, where it applies."""
    return ((qat.PASS,) if qat.applies(config, target, load.has_torch_stage(config.model.source)) else ()) + PER_TARGET


# --------------------------------------------------------------------------- planning


def _library_versions(names: tuple[str, ...]) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


@dataclass(frozen=True)
class PlannedPass:
    step: int
    pass_: Pass
    options: object
    key: str
    target: TargetProfile | None

    @property
    def label(self) -> str:
        return f"{self.step:02d}-{self.pass_.name}"


def cache_key(pass_: Pass, options, input_digest: str, data: TaskData, target: TargetProfile | None, signer: str) -> str:
    document = {
        "pass": pass_.name,
        "version": pass_.version,
        "input": input_digest,
        "options": options.model_dump(mode="json"),
        "libraries": _library_versions(pass_.libraries),
        "data": data.digest if pass_.uses_data else None,
        "target": target.sha256() if pass_.target_specific and target else None,
        "signer": signer if pass_.signs else None,
    }
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()[:32]


def plan_chain(passes, config: BuildConfig, start_digest: str, data: TaskData, target: TargetProfile | None, signer: str, first_step: int) -> list[PlannedPass]:
    planned, digest = [], start_digest
    for offset, pass_ in enumerate(passes):
        options = pass_.options_for(config, target)
        digest = cache_key(pass_, options, digest, data, target, signer)
        planned.append(PlannedPass(first_step + offset, pass_, options, digest, target))
    return planned


# --------------------------------------------------------------------------- the cache


def _encode(artifact: Artifact, entry: Path, work_dir: Path) -> dict:
    """The artifact as JSON; paths inside the (temporary) work dir are stored relative to the entry."""

    def path(value: Path | None) -> str | None:
        if value is None:
            return None
        return f"@/{value.relative_to(work_dir)}" if value.is_relative_to(work_dir) else str(value)

    document = {f.name: getattr(artifact, f.name) for f in fields(artifact)}
    document.update(
        stage=artifact.stage.value, directory=path(artifact.directory), float_model=path(artifact.float_model),
        trained_model=path(artifact.trained_model),
        kept_in_float=list(artifact.kept_in_float), engine_build=dict(artifact.engine_build) if artifact.engine_build else None,
        results=artifact.results.model_dump(mode="json", exclude_unset=True), gates=[g.model_dump(mode="json") for g in artifact.gates],
        task={**{f.name: getattr(artifact.task, f.name) for f in fields(artifact.task)},
              "tokenizer_file": path(artifact.task.tokenizer_file), "labels": list(artifact.task.labels),
              "input_names": list(artifact.task.input_names),
              "image": artifact.task.image.model_dump(mode="json") if artifact.task.image else None,
              "table": artifact.task.table.model_dump(mode="json") if artifact.task.table else None,
              "spectral": artifact.task.spectral.model_dump(mode="json") if artifact.task.spectral else None},
    )
    return document


def _decode(document: dict, entry: Path) -> Artifact:
    def path(value: str | None) -> Path | None:
        if value is None:
            return None
        return entry / value[2:] if value.startswith("@/") else Path(value)

    from device_agent.bundle import ImagePreprocessing, SpectralPreprocessing, TablePreprocessing

    task = document["task"]
    image = ImagePreprocessing.model_validate(task["image"]) if task.get("image") else None
    table = TablePreprocessing.model_validate(task["table"]) if task.get("table") else None
    spectral = SpectralPreprocessing.model_validate(task["spectral"]) if task.get("spectral") else None
    return Artifact(
        stage=Stage(document["stage"]), directory=path(document["directory"]), model_file=document["model_file"],
        digest=document["digest"],
        task=TaskSpec(task["kind"], tuple(task["labels"]), task["max_length"], path(task["tokenizer_file"]),
                      tuple(task["input_names"]), task["output_name"], image, table, spectral),
        precision=document["precision"], float_model=path(document["float_model"]),
        trained_model=path(document.get("trained_model")),
        kept_in_float=tuple(document["kept_in_float"]), engine_build=document["engine_build"],
        results=PassResults.model_validate(document["results"]), gates=tuple(Gate.model_validate(g) for g in document["gates"]),
    )


def read_artifact(entry: Path) -> Artifact | None:
    """The artifact a pass cache entry (``<cache>/<pass>/<key>``) holds, its relative paths read against ``entry``;
    None when the entry holds none (evicted, or never finished)."""
    manifest = entry / ARTIFACT_FILE
    return _decode(json.loads(manifest.read_text()), entry) if manifest.is_file() else None


def cached(cache_dir: Path, planned: PlannedPass) -> Artifact | None:
    return read_artifact(cache_dir / planned.pass_.name / planned.key)


def _evict(entry: Path) -> None:
    """Remove a cache entry: renamed away first (one atomic step for a concurrent build), then deleted."""
    doomed = entry.parent / f".evicted-{entry.name}-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(entry, doomed)
    except FileNotFoundError:  # another build evicted it first
        return
    shutil.rmtree(doomed, ignore_errors=True)


def _link(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target.resolve(), target_is_directory=True)


# --------------------------------------------------------------------------- running


@dataclass
class PassRecord:
    name: str
    seconds: float
    cached: bool
    key: str


@dataclass
class TargetResult:
    target: str
    artifact: Artifact | None = None
    bundle: Path | None = None
    passes: list[PassRecord] = field(default_factory=list)
    error: str | None = None

    @property
    def gates(self) -> tuple[Gate, ...]:
        return self.artifact.gates if self.artifact else ()

    @property
    def passed(self) -> bool:
        return self.error is None and self.bundle is not None and all(g.passed for g in self.gates)


class Build:
    """One build: the shared prefix once, then each target's suffix."""

    def __init__(self, config: BuildConfig, data: TaskData, out_dir: Path, cache_dir: Path, signing_key: Path, progress, say,
                 on_epoch=None) -> None:
        from device_agent.keys import key_id, load_private_key

        self.config, self.data, self.out_dir, self.cache_dir = config, data, out_dir, cache_dir
        self.signing_key, self.progress, self.say, self.on_epoch = signing_key, progress, say, on_epoch
        self.signer = key_id(load_private_key(signing_key).public_key())
        self.targets = [load_target(name) for name in config.targets]
        names = [t.name for t in self.targets]
        if len(set(names)) != len(names):
            raise EdgekitError(f"targets {names} name the same profile twice")

    def source_digest(self) -> str:
        return load.source_digest(self.config.model.source)

    def plan(self) -> tuple[list[PlannedPass], dict[str, list[PlannedPass]]]:
        prefix = plan_chain(shared_prefix(self.config), self.config, self.source_digest(), self.data, None, self.signer, 1)
        suffixes = {
            target.name: plan_chain(per_target(self.config, target), self.config, prefix[-1].key, self.data, target, self.signer, len(prefix) + 1)
            for target in self.targets
        }
        return prefix, suffixes

    def _execute(self, planned: PlannedPass, artifact: Artifact, link_dir: Path) -> tuple[Artifact, PassRecord]:
        pass_ = planned.pass_
        if artifact.stage not in pass_.takes:
            raise RuntimeError(f"pass {pass_.name} takes {sorted(s.value for s in pass_.takes)}, got {artifact.stage.value}")
        entry = self.cache_dir / pass_.name / planned.key
        started = time.perf_counter()
        hit = cached(self.cache_dir, planned)
        if hit is not None and pass_.remeasures_failures and not hit.gates_passed:
            self.say(f"{pass_.name}: the cached result failed its gates; measuring again on this host")
            _evict(entry)
            hit = None
        was_cached = hit is not None
        if hit is None:
            work = entry.parent / f".tmp-{planned.key}-{uuid.uuid4().hex[:8]}"
            work.mkdir(parents=True)
            try:
                checkpoints = entry.parent / f"{planned.key}.checkpoints"
                context = PassContext(work, self.data, self.progress, self.signing_key, self.say,
                                      checkpoint_dir=checkpoints, on_epoch=self.on_epoch)
                result = pass_.run(artifact, planned.options, context)
                if result.stage != pass_.gives:
                    raise RuntimeError(f"pass {pass_.name} must give {pass_.gives.value}, gave {result.stage.value}")
                result = replace(result, digest=planned.key)
                document = _encode(result, entry, work)
                (work / ARTIFACT_FILE).write_text(json.dumps(document, indent=2, default=str))
                try:
                    os.rename(work, entry)
                except OSError:  # another build finished the same pass first: its result is as good
                    shutil.rmtree(work, ignore_errors=True)
                shutil.rmtree(checkpoints, ignore_errors=True)
            except BaseException:
                shutil.rmtree(work, ignore_errors=True)
                raise
            hit = cached(self.cache_dir, planned)
            assert hit is not None
        _link(link_dir / "passes" / planned.label, entry)
        return hit, PassRecord(pass_.name, time.perf_counter() - started, was_cached, planned.key)

    def _source(self) -> Artifact:
        return Artifact(Stage.SOURCE, Path(self.config.model.source), "", self.source_digest(),
                        TaskSpec(self.config.task.kind, self.data.labels, self.config.task.max_length, None))

    def train(self, after_load: Callable[[Artifact], None] | None = None) -> Artifact:
        """The shared prefix up to the export: the trained model a search trial compares (a PyTorch folder, or the ONNX
        model of one trained straight to ONNX). ``after_load`` sees the loaded model before fine-tuning or pruning
        train it further (and may raise to stop there)."""
        prefix, _ = self.plan()
        artifact = self._source()
        for planned in prefix:
            if planned.pass_ is export.PASS:
                break
            artifact, _ = self._execute(planned, artifact, self.out_dir)
            if planned.pass_ is load.PASS and after_load is not None:
                after_load(artifact)
        return artifact

    def discard_checkpoints(self) -> None:
        """Delete the epoch checkpoints of this build's passes (a search trial stopped for good is never resumed)."""
        for planned in self.plan()[0]:
            shutil.rmtree(self.cache_dir / planned.pass_.name / f"{planned.key}.checkpoints", ignore_errors=True)

    def run(self) -> list[TargetResult]:
        prefix, suffixes = self.plan()
        artifact = self._source()
        shared_records = []
        for planned in prefix:
            artifact, record = self._execute(planned, artifact, self.out_dir)
            shared_records.append(record)
        results = []
        for target in self.targets:
            result = TargetResult(target.name, passes=list(shared_records))
            current = artifact
            for planned in suffixes[target.name]:
                if planned.pass_ is package.PASS and not current.gates_passed:
                    self.say(f"{target.name}: gates failed; no bundle is written (the best model and the report are kept)")
                    break
                try:
                    current, record = self._execute(planned, current, self.out_dir / target.name)
                except EdgekitError as error:
                    result.error = f"{planned.pass_.name}: {error}"
                    break
                result.passes.append(record)
            result.artifact = current
            if current.stage is Stage.BUNDLE and result.error is None:
                result.bundle = self.out_dir / target.name / current.model_file
                shutil.copy(current.model_path, result.bundle)
            results.append(result)
        return results
