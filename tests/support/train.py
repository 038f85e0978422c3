"""Train a test's toy model in the build's own loop (edgekit.training): fixed batches, no validation, no checkpoints."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from rich.progress import Progress

from edgekit import training


class FixedBatches:
    """The same batches, in order, every epoch."""

    def __init__(self, batches: Sequence[training.Batch]) -> None:
        self.batches = list(batches)
        self.steps_per_epoch = len(self.batches)

    def epoch(self, epoch: int) -> Iterator[training.Batch]:
        return iter(self.batches)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class EpochOrders:
    """Epoch ``e`` visits ``orders[e - 1]`` (row indices), ``batch_size`` rows a batch, made by ``make(rows, epoch)``."""

    def __init__(self, orders: Sequence, batch_size: int, make: Callable) -> None:
        self.orders, self.batch_size, self.make = orders, batch_size, make
        self.steps_per_epoch = -(-len(orders[0]) // batch_size)

    def epoch(self, epoch: int) -> Iterator[training.Batch]:
        order = self.orders[epoch - 1]
        for start in range(0, len(order), self.batch_size):
            yield self.make(order[start:start + self.batch_size], epoch)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def fit_on(model, batches: Sequence[training.Batch], *, learning_rate: float, epochs: int = 1,
           forward: Callable = lambda model, inputs: model(*inputs.values())):
    """``model`` trained with AdamW (no weight decay) on ``batches``; returned in eval mode."""
    training.fit(model, FixedBatches(batches), training.cross_entropy(forward),
                 training.FitSettings(epochs, learning_rate, weight_decay=0.0), progress=Progress(disable=True))
    return model
