"""finetune: adapt the loaded model to the build's data, CUDA when present.

The task does the work (``edgekit.tasks``) in the one training loop
(``edgekit.training.fit``): text models train LoRA adapters (peft) on the
encoder's attention and feed-forward projections, or every weight, starting
from the head the load pass fitted; image models train every weight. Each epoch
is judged on the validation split; training stops early when it stops
improving, and the best epoch's weights are kept (the loaded model competes).
A LoRA adapter is saved on its own (``adapter/``) and merged into the base
weights, so export sees a plain model.

Before training, the step's memory is estimated (``edgekit.memory``) so a batch
too large for the host is a clear message rather than an OOM kill. After each
epoch a checkpoint goes to the pass's checkpoint folder, so a build interrupted
mid-training resumes after its last finished epoch. The report carries test
accuracy and macro F1 of the loaded model and of the fine-tuned one, side by side.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, SerializeAsAny

from edgekit.artifact import Artifact, Pass, PassContext, Stage
from edgekit.config import BuildConfig, FinetuneSection
from edgekit.targets import TargetProfile


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    finetune: FinetuneSection
    task: SerializeAsAny[BaseModel]  # the task's settings (edgekit.tasks.Task.settings)


def options_for(config: BuildConfig, target: TargetProfile | None) -> Options:
    from edgekit.tasks import task_for

    return Options(finetune=config.finetune, task=task_for(config.task.kind).settings(config))


def run(artifact: Artifact, options: Options, ctx: PassContext) -> Artifact:
    from edgekit.tasks import task_for

    return task_for(artifact.task.kind).finetune(artifact, options.finetune, options.task, ctx)


PASS = Pass(
    name="finetune",
    takes=frozenset({Stage.TORCH}),
    gives=Stage.TORCH,
    libraries=("torch", "transformers", "peft"),
    version=2,  # 2: text batches grouped by token count (other rows share a batch, so other weights)
    options_for=options_for,
    run=run,
)
