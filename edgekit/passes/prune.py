"""prune: remove whole attention heads and FFN neurons (or conv channels) so the exported model is smaller and faster.

The algorithms live in ``edgekit.pruning`` (``encoder`` for BERT-layout text
encoders, ``cnn`` for sequential CNNs); the task picks its own. The goal is a
``ratio``, or (text encoders) a latency goal met by bisection over ratios, each
candidate exported as the export pass exports and timed in ONNX Runtime.
Recovery fine-tunes the pruned model in the training loop and is kept only when
validation accuracy says it is better.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, SerializeAsAny

from edgekit.artifact import Artifact, Pass, PassContext, Stage
from edgekit.config import BuildConfig, PruneSection
from edgekit.targets import TargetProfile


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    prune: PruneSection
    task: SerializeAsAny[BaseModel]  # the task's settings (edgekit.tasks.Task.settings)


def options_for(config: BuildConfig, target: TargetProfile | None) -> Options:
    from edgekit.tasks import task_for

    return Options(prune=config.prune, task=task_for(config.task.kind).settings(config))


def run(artifact: Artifact, options: Options, ctx: PassContext) -> Artifact:
    from edgekit.tasks import task_for

    return task_for(artifact.task.kind).prune(artifact, options.prune, options.task, ctx)


PASS = Pass(
    name="prune",
    takes=frozenset({Stage.TORCH}),
    gives=Stage.TORCH,
    libraries=("torch", "transformers", "onnxruntime"),
    options_for=options_for,
    run=run,
)
