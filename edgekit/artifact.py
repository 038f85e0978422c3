"""The frozen record that flows between passes, and what a pass is.

A build is a literal, ordered list of passes (see ``edgekit/pipeline.py``). Each
pass takes an :class:`Artifact` of a declared stage and gives one of another
stage; the pipeline checks the stages, caches each output under a content hash,
and keeps every intermediate visible under the build directory.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Generic, TypeVar

from pydantic import BaseModel, JsonValue

from edgekit.results import Gate, PassResults

if TYPE_CHECKING:
    from rich.progress import Progress

    from device_agent.bundle import ImagePreprocessing, SpectralPreprocessing, TablePreprocessing
    from edgekit.config import BuildConfig
    from edgekit.targets import TargetProfile
    from edgekit.data import TaskData


class Stage(str, Enum):
    SOURCE = "source"  # the model source as named in the config (nothing copied yet)
    TORCH = "torch"  # a Hugging Face model folder
    ONNX = "onnx"  # a float ONNX model
    OPTIMIZED = "optimized-onnx"  # a float ONNX model after graph optimisation for one target
    QUANTIZED = "quantized-onnx"  # the model at the target's precision (may still be fp32 when int8 failed the budget)
    ENGINE = "engine"  # the model plus what the target's runtime needs to build or load an engine
    EVALUATED = "evaluated"  # the same model with measured metrics and gates
    BUNDLE = "bundle"  # a signed .ekb


@dataclass(frozen=True)
class TaskSpec:
    """What the model does and how its inputs are made."""

    kind: str  # the task (a key of edgekit.tasks.TASKS): how inputs are made and what the model does
    labels: tuple[str, ...]
    max_length: int  # text: tokens per input (0 for images)
    tokenizer_file: Path | None  # text: tokenizer.json (Hugging Face tokenizers format)
    input_names: tuple[str, ...] = ("input_ids", "attention_mask", "token_type_ids")
    output_name: str = "logits"
    # Images: how raw uint8 images become the model's input, exactly as the bundle records it for the device.
    image: "ImagePreprocessing | None" = None
    # Tables: how raw rows become the model's input (columns, fills, categories), as the bundle records it.
    table: "TablePreprocessing | None" = None
    # Series models of spectral features: how raw windows become the model's input, as the bundle records it.
    spectral: "SpectralPreprocessing | None" = None


@dataclass(frozen=True)
class Artifact:
    """One stage's output: files in ``directory`` plus what later passes need to know about them."""

    stage: Stage
    directory: Path
    model_file: str  # relative to directory ("model.onnx", or "." for a Hugging Face folder)
    digest: str  # content address: the cache key of the pass that made it, or a hash of the source files
    task: TaskSpec
    precision: str = "fp32"
    float_model: Path | None = None  # the float ONNX model this one derives from (fidelity is measured against it)
    trained_model: Path | None = None  # ONNX stages: the PyTorch model folder exported (quantization-aware training retrains it)
    kept_in_float: tuple[str, ...] = ()
    engine_build: Mapping[str, JsonValue] | None = None
    results: PassResults = PassResults()  # what each pass so far measured (edgekit.results)
    gates: tuple[Gate, ...] = ()  # the target's budgets, judged by the evaluate pass

    @property
    def gates_passed(self) -> bool:
        return all(gate.passed for gate in self.gates)

    def recording(self, **results) -> PassResults:
        """This artifact's results with a pass's own record added (``recording(prune=PruneResult(...))``)."""
        return self.results.model_copy(update=results)

    @property
    def model_path(self) -> Path:
        return self.directory / self.model_file


@dataclass(frozen=True)
class PassContext:
    """What a pass may use besides its input and options: a fresh folder to write to, the data, progress, the signing key."""

    work_dir: Path
    data: "TaskData"
    progress: "Progress"
    signing_key: Path
    say: Callable[[str], None]
    # Survives an interrupted run of the same pass (same cache key), so long
    # training can resume; the pipeline deletes it once the pass has finished.
    checkpoint_dir: Path | None = None
    # Hears each training epoch's validation score (a search's trial reports it and may stop the pass by raising).
    on_epoch: Callable[[int, float], None] | None = None


OptionsT = TypeVar("OptionsT", bound=BaseModel)


@dataclass(frozen=True)
class Pass(Generic[OptionsT]):
    """A small typed unit with one job; ``run`` must write only into ``ctx.work_dir``."""

    name: str
    takes: frozenset[Stage]
    gives: Stage
    options_for: Callable[["BuildConfig", "TargetProfile | None"], OptionsT]
    run: Callable[[Artifact, OptionsT, PassContext], Artifact]
    libraries: tuple[str, ...] = ()  # distributions whose versions are part of the cache key
    version: int = 1  # raise it when the pass's output changes for the same input and options
    target_specific: bool = False  # runs per target (the target profile is part of the cache key)
    uses_data: bool = True  # the build's data is part of the cache key
    signs: bool = False  # the signing key is part of the cache key
    # Its output includes measurements of this host at run time (latency): a cached result whose gates failed is not
    # replayed but measured again, so a build that failed on a busy machine can pass by being rerun.
    remeasures_failures: bool = False
