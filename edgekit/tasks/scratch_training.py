"""Training a one-input classifier built here (time series, tables) from float arrays, in the one training loop.

AdamW with warm-up then cosine decay, early stopping on the validation loss
(small validation sets tie on accuracy within a few epochs, while the loss keeps
telling better weights from worse), checkpoints per epoch, and the numbers the
load and finetune results record.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

    from edgekit.artifact import PassContext
    from edgekit.config import TrainSection

PREDICT_BATCH = 256


def train_classifier(model: torch.nn.Module, ctx: PassContext, settings: TrainSection, what: str, keep_initial: bool, *,
                     input_name: str, train_x: np.ndarray, val_x: np.ndarray) -> dict:
    """Train ``model`` (called as ``model(x)``) on ``train_x`` with ``ctx.data``'s labels; the run's numbers.

    ``keep_initial``: the weights it starts with compete (finetune), so a run that makes them worse keeps them.
    """
    import torch

    from edgekit import training
    from edgekit.checkpoints import Checkpoints
    from edgekit.measure import classification_metrics

    data = ctx.data
    rows = min(len(train_x), settings.max_train_rows or len(train_x))
    train_labels = data.train.labels[:rows]

    def forward(module, inputs) -> torch.Tensor:
        return module(inputs[input_name])

    def val_logits(module) -> torch.Tensor:
        batches = ({input_name: torch.from_numpy(np.ascontiguousarray(val_x[start:start + PREDICT_BATCH]))}
                   for start in range(0, len(val_x), PREDICT_BATCH))
        return torch.from_numpy(training.predict(module, batches, forward))

    def accuracy(module) -> float:
        return classification_metrics(data.val.labels, val_logits(module).argmax(-1).numpy(), data.labels).accuracy

    def negative_loss(module) -> float:
        return -float(torch.nn.functional.cross_entropy(val_logits(module), torch.from_numpy(data.val.labels)))

    def batch(indices: np.ndarray, _epoch: int) -> training.Batch:
        return training.Batch({input_name: torch.from_numpy(train_x[indices])}, torch.from_numpy(train_labels[indices]))

    steps_per_epoch = math.ceil(rows / settings.batch_size)
    fit_settings = training.FitSettings(settings.epochs, settings.learning_rate, settings.weight_decay, "cosine",
                                        int(settings.warmup_ratio * steps_per_epoch * settings.epochs),
                                        settings.early_stopping_patience, label=what)
    result = training.fit(model, training.Shuffled(rows, settings.batch_size, settings.seed, batch),
                          training.cross_entropy(forward), fit_settings, progress=ctx.progress, say=ctx.say,
                          validate=negative_loss, initial=(lambda m: (negative_loss(m), {"accuracy": accuracy(m)})) if keep_initial else None,
                          checkpoints=Checkpoints(ctx.checkpoint_dir), on_epoch=ctx.on_epoch)
    return {"device": result.device, "val_accuracy": accuracy(model), "val_accuracy_before": result.extra.get("accuracy"),
            "best_epoch": result.best_epoch, "epochs_run": result.epochs_run, "seconds": round(result.seconds, 2),
            "samples_per_second": round(result.samples_per_second, 1) if result.samples_per_second else None,
            "loss_curve": result.loss_curve(steps_per_epoch),
            "kept": "trained" if result.improved else "the starting weights (no epoch beat them on validation)"}
