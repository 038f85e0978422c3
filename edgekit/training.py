"""The one training loop: every pass that trains a model (the head fit, fine-tuning, image training, prune
recovery) calls :func:`fit`, and every gradient edgekit computes goes through this module.

What a caller gives, and what differs between callers, are arguments, not subclasses:

- the model and the parameters to train (all that require a gradient, by default);
- a :class:`BatchSource` that yields the batches of each epoch (its shuffling state
  is checkpointed with the model, so a resumed run draws what the uninterrupted
  run would have);
- a loss ``(model, batch) -> scalar tensor`` (:func:`cross_entropy`,
  :func:`distillation`);
- ``validate(model) -> score``, judged after each epoch: the best epoch's weights
  are kept, and training stops after ``patience`` epochs without a better score.
  ``initial`` scores the starting weights, which then compete (fine-tuning keeps
  the loaded model when no epoch beats it).

The loop owns the rest: the device (CUDA when present) and bf16 autocast there,
AdamW, the learning-rate schedule (constant, linear or cosine, after a linear
warm-up), gradient accumulation, one checkpoint per finished epoch and resuming
from the newest, the memory check before the first step, progress and the loss
curve. Seeding the model's initialisation and dropout is the caller's: it happens
where the model is built, before this loop starts.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

from edgekit.checkpoints import Checkpoints

if TYPE_CHECKING:
    import torch

LENGTH_GROUP_BATCHES = 32  # batches per group sorted by length (Shuffled): long enough to find equal lengths

Forward = Callable[["torch.nn.Module", Mapping[str, "torch.Tensor"]], "torch.Tensor"]


@dataclass(frozen=True)
class Batch:
    """Model inputs by name, the labels, and (for distillation) the teacher's logits of the same rows."""

    inputs: Mapping[str, "torch.Tensor"]
    labels: "torch.Tensor"
    teacher: "torch.Tensor | None" = None

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: str) -> "Batch":
        if device == "cpu":
            return self
        teacher = self.teacher.to(device) if self.teacher is not None else None
        return Batch({k: v.to(device) for k, v in self.inputs.items()}, self.labels.to(device), teacher)


class BatchSource(Protocol):
    """The batches of each epoch; ``state_dict``/``load_state_dict`` carry whatever decides their order."""

    steps_per_epoch: int

    def epoch(self, epoch: int) -> Iterator[Batch]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class Shuffled:
    """Rows in a fresh random order every epoch, cut into batches that ``make(rows, epoch)`` turns into tensors.

    ``reseed_each_epoch``: epoch ``e`` draws from ``seed * 1000 + e`` alone (nothing to checkpoint); otherwise one
    generator runs through all epochs and its state is checkpointed.

    ``lengths`` (each row's length, e.g. its token count) groups rows of similar length into a batch, as text batches
    are padded to their longest row: the shuffled rows are cut into groups of ``LENGTH_GROUP_BATCHES`` batches, each
    group is sorted by length and cut into batches, and the epoch's batches are shuffled again. Which rows share a
    batch stays random within a group, and far less padding is computed (bench/README.md, "Search": the epoch times).
    """

    def __init__(self, rows: int, batch_size: int, seed: int, make: Callable[[np.ndarray, int], Batch], *,
                 reseed_each_epoch: bool = False, lengths: np.ndarray | None = None) -> None:
        import torch

        if lengths is not None and len(lengths) != rows:
            raise ValueError(f"{len(lengths)} lengths for {rows} rows")
        self.rows, self.batch_size, self.seed, self.make = rows, batch_size, seed, make
        self.reseed_each_epoch = reseed_each_epoch
        self.lengths = None if lengths is None else np.asarray(lengths)
        self.generator = torch.Generator().manual_seed(seed)
        self.steps_per_epoch = math.ceil(rows / batch_size)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        import torch

        generator = torch.Generator().manual_seed(self.seed * 1000 + epoch) if self.reseed_each_epoch else self.generator
        order = torch.randperm(self.rows, generator=generator).numpy()
        for rows in self._batches(order, generator):
            yield self.make(rows, epoch)

    def _batches(self, order: np.ndarray, generator) -> list[np.ndarray]:
        import torch

        if self.lengths is None:
            return [order[start:start + self.batch_size] for start in range(0, len(order), self.batch_size)]
        group = self.batch_size * LENGTH_GROUP_BATCHES  # a multiple of the batch size: only the last batch is short
        batches = []
        for start in range(0, len(order), group):
            rows = order[start:start + group]
            rows = rows[np.argsort(self.lengths[rows], kind="stable")]
            batches.extend(rows[i:i + self.batch_size] for i in range(0, len(rows), self.batch_size))
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class InOrder:
    """A fixed sequence of rows (e.g. a few shuffled epochs cut to a step count), as one epoch of batches."""

    def __init__(self, order: np.ndarray, batch_size: int, make: Callable[[np.ndarray, int], Batch]) -> None:
        self.order, self.batch_size, self.make = order, batch_size, make
        self.steps_per_epoch = math.ceil(len(order) / batch_size)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        for start in range(0, len(self.order), self.batch_size):
            yield self.make(self.order[start:start + self.batch_size], epoch)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass(frozen=True)
class FitSettings:
    """One run's hyper-parameters; ``patience`` counts epochs without a better validation score before stopping."""

    epochs: int
    learning_rate: float
    weight_decay: float = 0.01
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 0  # optimizer steps (batches / accumulation_steps)
    patience: int | None = None
    accumulation_steps: int = 1
    label: str = "training"  # progress bars and messages
    # False: the model trains in eval mode (no dropout, normalisation statistics frozen), for distillation to the
    # model's own deterministic logits, where dropout noise (which a module's p does not always control) swamps the signal.
    train_mode: bool = True
    score_name: str = "validation accuracy"  # what ``validate`` returns, in messages
    # False: float32 on CUDA too, where arithmetic must be exact (quantization-aware training emulates int8 rounding,
    # which bf16's 8-bit mantissa would blur)
    bf16_autocast: bool = True


@dataclass
class FitResult:
    device: str
    best_score: float | None  # the best validation score (the initial one when no epoch beat it); None without validation
    initial_score: float | None
    best_epoch: int  # 0: the starting weights were kept
    epochs_run: int
    seconds: float
    seen: int  # training rows processed
    losses: list[float] = field(default_factory=list)
    resumed_after_epoch: int | None = None
    extra: dict = field(default_factory=dict)  # what ``initial`` returned besides its score (kept across a resume)

    @property
    def improved(self) -> bool:
        """Whether the weights left in the model are trained ones rather than the starting weights."""
        return self.best_epoch > 0 or self.initial_score is None

    @property
    def samples_per_second(self) -> float | None:
        return self.seen / self.seconds if self.seconds else None

    def loss_curve(self, steps_per_epoch: int) -> list[float]:
        """Mean loss over each quarter epoch."""
        stride = max(1, steps_per_epoch // 4)
        return [float(np.mean(self.losses[i:i + stride])) for i in range(0, len(self.losses), stride)]


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def autocast(on: str, allowed: bool = True):
    """bf16 autocast on a CUDA device that supports it (unless not ``allowed``); a no-op elsewhere."""
    import torch

    return torch.autocast(on, dtype=torch.bfloat16, enabled=allowed and on == "cuda" and torch.cuda.is_bf16_supported())


def cross_entropy(forward: Forward, label_smoothing: float = 0.0):
    """The loss of a classifier on its labels (``label_smoothing``: the share of each target spread over all classes)."""
    import torch.nn.functional as F

    def loss(model, batch: Batch):
        return F.cross_entropy(forward(model, batch.inputs).float(), batch.labels, label_smoothing=label_smoothing)

    return loss


def distillation(forward: Forward, temperature: float, label_weight: float = 0.5):
    """Labels and the teacher's softened logits (KL, scaled by T²), mixed; batches without a teacher use labels only."""
    import torch.nn.functional as F

    def loss(model, batch: Batch):
        logits = forward(model, batch.inputs).float()
        hard = F.cross_entropy(logits, batch.labels)
        if batch.teacher is None:
            return hard
        t = temperature
        soft = F.kl_div(F.log_softmax(logits / t, -1), F.softmax(batch.teacher / t, -1), reduction="batchmean")
        return label_weight * hard + (1 - label_weight) * t * t * soft

    return loss


def _schedule(settings: FitSettings, total_steps: int) -> Callable[[int], float]:
    warmup = settings.warmup_steps

    def factor(step: int) -> float:
        if settings.schedule == "constant":
            return 1.0
        if settings.schedule == "linear":  # warm-up from 0, then linear decay to 0 (as transformers' linear schedule)
            if step < warmup:
                return float(step) / float(max(1, warmup))
            return max(0.0, float(total_steps - step) / float(max(1, total_steps - warmup)))
        if step < warmup:  # cosine: warm-up from 1/warmup, then cosine decay to 0
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    return factor


@dataclass
class _Run:
    """What a checkpoint carries besides the model, optimizer, schedule and batch order."""

    best_score: float | None
    initial_score: float | None
    best_epoch: int = 0
    best_state: dict | None = None
    losses: list[float] = field(default_factory=list)
    seen: int = 0
    seconds: float = 0.0
    stopped: bool = False
    extra: dict = field(default_factory=dict)
    last_score: float | None = None


def fit(model: "torch.nn.Module", batches: BatchSource, loss: Callable[["torch.nn.Module", Batch], "torch.Tensor"],
        settings: FitSettings, *, progress, say: Callable[[str], None] = lambda _: None,
        validate: Callable[["torch.nn.Module"], float] | None = None,
        initial: Callable[["torch.nn.Module"], tuple[float, dict]] | None = None,
        checkpoints: Checkpoints = Checkpoints(None), parameters: Iterable["torch.nn.Parameter"] | None = None,
        learning_rates: Mapping[str, float] | None = None, memory_check: Callable[[str], None] | None = None,
        on_epoch: Callable[[int, float], None] | None = None) -> FitResult:
    """Train ``model`` in place; the best epoch's weights (by ``validate``) are left in it, on the CPU, in eval mode.

    ``learning_rates`` maps module names (a part of a parameter's dotted name, e.g. ``classifier``) to their own
    learning rate (a head trained faster than the encoder under it); the rest train at ``settings.learning_rate``. ``on_epoch(epoch, score)`` hears each
    epoch's validation score after its checkpoint is saved: it returns True to end training there (the best epoch is
    kept, as with early stopping: a search whose budget is spent) or raises to abandon the run (a pruned trial).
    """
    import torch

    on = device()
    if memory_check is not None:
        memory_check(on)
    model.to(on)
    trained = [p for p in (parameters if parameters is not None else model.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(_parameter_groups(model, trained, settings.learning_rate, learning_rates or {}),
                                  lr=settings.learning_rate, weight_decay=settings.weight_decay)
    total_steps = batches.steps_per_epoch * settings.epochs
    optimizer_steps = math.ceil(batches.steps_per_epoch / settings.accumulation_steps) * settings.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(settings, optimizer_steps))
    run, first_epoch = _start_or_resume(model, optimizer, scheduler, batches, checkpoints, initial, say, settings.label)
    started = time.perf_counter() - run.seconds
    task = progress.add_task(f"{settings.label} ({on})", total=total_steps, completed=batches.steps_per_epoch * (first_epoch - 1))
    epoch = first_epoch - 1
    with_autocast = autocast(on, settings.bf16_autocast)
    for epoch in range(first_epoch, settings.epochs + 1):
        if run.stopped:  # the interrupted run had already decided to stop
            epoch -= 1
            break
        model.train(settings.train_mode)
        _one_epoch(model, batches.epoch(epoch), loss, optimizer, scheduler, settings, on, with_autocast, run,
                   lambda: progress.update(task, advance=1, description=_describe(settings.label, epoch, run)),
                   batches.steps_per_epoch)
        if validate is not None:
            _judge_epoch(model, validate, epoch, run, settings, say)
        run.seconds = time.perf_counter() - started
        checkpoints.save(epoch, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                 "scheduler": scheduler.state_dict(), "batches": batches.state_dict(), "run": run.__dict__})
        if on_epoch is not None and run.last_score is not None and on_epoch(epoch, run.last_score):
            run.stopped = True  # asked to end here: the best epoch so far is kept, as when early stopping ends a run
        if run.stopped:
            break
    progress.remove_task(task)
    if run.best_state is not None:
        model.load_state_dict(run.best_state)
    model.to("cpu").eval()
    return FitResult(on, run.best_score, run.initial_score, run.best_epoch, epoch, time.perf_counter() - started, run.seen,
                     run.losses, first_epoch - 1 or None, run.extra)


def _parameter_groups(model, trained: list, default: float, learning_rates: Mapping[str, float]) -> list[dict]:
    """AdamW parameter groups: parameters under a module named in ``learning_rates`` at its rate, the rest at ``default``."""
    names = {id(p): name for name, p in model.named_parameters()}
    groups: dict[float, list] = {}
    for parameter in trained:
        parts = names.get(id(parameter), "").split(".")
        rate = next((r for module, r in learning_rates.items() if module in parts), default)
        groups.setdefault(rate, []).append(parameter)
    return [{"params": params, "lr": rate} for rate, params in groups.items()]


def _start_or_resume(model, optimizer, scheduler, batches: BatchSource, checkpoints: Checkpoints, initial, say,
                     label: str) -> tuple[_Run, int]:
    resumed = checkpoints.latest()
    if resumed is None:
        if initial is None:
            return _Run(best_score=None, initial_score=None), 1
        score, extra = initial(model)
        # The starting weights compete: kept so that they are what remains when no epoch beats them.
        return _Run(best_score=score, initial_score=score, best_state=snapshot(model), extra=extra), 1
    # An earlier run of the same pass (same model, data and settings) was interrupted: go on after its last epoch.
    model.load_state_dict(resumed["model"])
    optimizer.load_state_dict(resumed["optimizer"])
    scheduler.load_state_dict(resumed["scheduler"])
    batches.load_state_dict(resumed["batches"])
    say(f"{label}: resuming after epoch {resumed['epoch']} from a checkpoint")
    return _Run(**resumed["run"]), resumed["epoch"] + 1


def _one_epoch(model, epoch_batches: Iterator[Batch], loss, optimizer, scheduler, settings: FitSettings, on: str,
               with_autocast, run: _Run, advance: Callable[[], None], steps_per_epoch: int) -> None:
    accumulated, group = 0, settings.accumulation_steps
    for index, batch in enumerate(epoch_batches):
        batch = batch.to(on)
        with with_autocast:
            value = loss(model, batch)
        if accumulated == 0:
            optimizer.zero_grad()
            # The epoch's last group may be short: its gradient is still the mean over the batches it has.
            group = min(settings.accumulation_steps, steps_per_epoch - index)
        (value / group if group > 1 else value).backward()
        accumulated += 1
        if accumulated == group:
            optimizer.step()
            scheduler.step()
            accumulated = 0
        run.seen += len(batch)
        run.losses.append(value.item())
        advance()


def _judge_epoch(model, validate, epoch: int, run: _Run, settings: FitSettings, say) -> None:
    score = run.last_score = validate(model)
    say(f"{settings.label}: epoch {epoch}: loss {np.mean(run.losses[-50:]):.4f}, {settings.score_name} {score:.4f}")
    if run.best_score is None or score > run.best_score:
        run.best_score, run.best_epoch = score, epoch
        run.best_state = snapshot(model)
    run.stopped = settings.patience is not None and epoch - run.best_epoch >= settings.patience


def _describe(label: str, epoch: int, run: _Run) -> str:
    best = f" (val acc {run.best_score:.4f})" if run.best_score is not None else ""
    return f"{label} epoch {epoch} loss {np.mean(run.losses[-20:]):.3f}{best}"


def predict(model: "torch.nn.Module", batches: Iterable[Mapping[str, "torch.Tensor"]], forward: Forward, *,
            bf16_autocast: bool = True) -> np.ndarray:
    """Logits (float32, on the CPU) of every batch of inputs, in order, with the model in eval mode (bf16 autocast on
    CUDA unless ``bf16_autocast`` is False)."""
    import torch

    on = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.inference_mode(), autocast(on.type, bf16_autocast):
            for inputs in batches:
                out.append(forward(model, {k: v.to(on) for k, v in inputs.items()}).float().cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(out)


def accumulate_gradients(model: "torch.nn.Module", batches: Iterable[Batch], loss) -> None:
    """Backpropagate each batch's loss with the model in eval mode (no dropout) and no optimizer step.

    For importance scores: hooks registered by the caller read the gradients as they pass; parameter gradients
    are cleared before each batch and after the last.
    """
    on = next(model.parameters()).device.type
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model.zero_grad(set_to_none=True)
            loss(model, batch.to(on)).backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)


def snapshot(model: "torch.nn.Module") -> dict[str, Any]:
    """A CPU copy of the model's state, to put back with ``load_state_dict``."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
