"""The one training loop: best epoch kept (the starting weights too), early stopping, resume, accumulation, schedules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from rich.progress import Progress

from edgekit import training
from edgekit.checkpoints import Checkpoints
from tests.support.train import FixedBatches


def _forward(model, inputs):
    return model(inputs["x"])


def _data(rows: int = 64, seed: int = 0) -> list[training.Batch]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 4, generator=generator)
    y = (x[:, 0] > 0).long()
    return [training.Batch({"x": x[i:i + 16]}, y[i:i + 16]) for i in range(0, rows, 16)]


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 2)


def _fit(model, scores, *, patience=None, initial=None, epochs=6, checkpoints=Checkpoints(None), say=lambda _: None, **settings):
    """Train with ``validate`` returning ``scores`` in turn (a scripted validation curve)."""
    curve = iter(scores)
    return training.fit(model, FixedBatches(_data()), training.cross_entropy(_forward),
                        training.FitSettings(epochs, 0.05, patience=patience, **settings), progress=Progress(disable=True),
                        validate=lambda _m: next(curve), initial=initial, checkpoints=checkpoints, say=say)


def test_the_best_epochs_weights_are_left_in_the_model_and_patience_stops_training():
    weights = {}

    model = _model()
    result = _fit(model, [0.5, 0.7, 0.6, 0.65, 0.9, 0.95], patience=2)
    assert (result.best_epoch, result.epochs_run, result.best_score) == (2, 4, 0.7), "two epochs without a better score stop it"
    weights["kept"] = model.weight.detach().clone()
    again = _model()
    _fit(again, [0.5, 0.7], epochs=2)
    assert torch.equal(weights["kept"], again.weight), "the model holds epoch 2's weights, not epoch 4's"


def test_starting_weights_that_no_epoch_beats_are_what_remains():
    model = _model()
    before = training.snapshot(model)
    result = _fit(model, [0.4, 0.3], initial=lambda _m: (0.9, {"note": "head only"}), epochs=2)
    assert not result.improved and result.best_epoch == 0 and result.extra == {"note": "head only"}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the starting weights are put back"


def test_an_interrupted_run_resumes_after_its_last_epoch_and_ends_where_an_uninterrupted_run_ends(tmp_path):
    straight = _model()
    _fit(straight, [0.1, 0.2, 0.3, 0.4], epochs=4, patience=5)

    def stop_in_epoch_3(message: str) -> None:
        if "epoch 3:" in message:
            raise KeyboardInterrupt

    interrupted = _model()
    with pytest.raises(KeyboardInterrupt):
        _fit(interrupted, [0.1, 0.2, 0.3, 0.4], epochs=4, patience=5, checkpoints=Checkpoints(tmp_path), say=stop_in_epoch_3)
    resumed = _model(seed=1)  # other starting weights: the checkpoint must replace them
    result = _fit(resumed, [0.3, 0.4], epochs=4, patience=5, checkpoints=Checkpoints(tmp_path))
    assert result.resumed_after_epoch == 2 and result.epochs_run == 4
    assert torch.equal(resumed.weight, straight.weight) and torch.equal(resumed.bias, straight.bias)


def test_accumulating_two_half_batches_takes_the_step_one_whole_batch_takes():
    x, y = torch.randn(8, 4, generator=torch.Generator().manual_seed(3)), torch.tensor([0, 1] * 4)
    whole, halves = _model(), _model()
    for model, batches, steps in ((whole, [training.Batch({"x": x}, y)], 1),
                                  (halves, [training.Batch({"x": x[:4]}, y[:4]), training.Batch({"x": x[4:]}, y[4:])], 2)):
        training.fit(model, FixedBatches(batches), training.cross_entropy(_forward),
                     training.FitSettings(1, 0.1, accumulation_steps=steps), progress=Progress(disable=True))
    np.testing.assert_allclose(whole.weight.detach().numpy(), halves.weight.detach().numpy(), atol=1e-6)


def test_the_linear_schedule_is_transformers_linear_schedule():
    from transformers import get_linear_schedule_with_warmup

    ours = training._schedule(training.FitSettings(1, 1.0, schedule="linear", warmup_steps=7), 50)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    theirs = get_linear_schedule_with_warmup(optimizer, 7, 50).lr_lambdas[0]
    assert [ours(step) for step in range(60)] == [theirs(step) for step in range(60)]


def test_distillation_mixes_labels_and_the_teachers_softened_logits():
    model = _model()
    batch = _data()[0]
    teacher = torch.randn(len(batch), 2)
    plain = training.distillation(_forward, 2.0)(model, batch)
    assert torch.isclose(plain, training.cross_entropy(_forward)(model, batch)), "without a teacher: labels only"
    mixed = training.distillation(_forward, 2.0)(model, training.Batch(batch.inputs, batch.labels, teacher))
    assert not torch.isclose(mixed, plain)


def test_on_epoch_hears_each_score_and_can_end_training_keeping_the_best_epoch():
    heard = []

    def on_epoch(epoch: int, score: float) -> bool:
        heard.append((epoch, score))
        return epoch == 3  # a search whose budget is spent after epoch 3

    model = _model()
    curve = iter([0.5, 0.8, 0.6, 0.9, 0.95])
    result = training.fit(model, FixedBatches(_data()), training.cross_entropy(_forward), training.FitSettings(5, 0.05),
                          progress=Progress(disable=True), validate=lambda _m: next(curve), on_epoch=on_epoch)
    assert heard == [(1, 0.5), (2, 0.8), (3, 0.6)] and result.epochs_run == 3
    assert (result.best_epoch, result.best_score) == (2, 0.8), "the best epoch so far is what remains"
    again = _model()
    _fit(again, [0.5, 0.8], epochs=2)
    assert torch.equal(model.weight, again.weight)


def test_parameters_under_a_named_module_train_at_their_own_learning_rate():
    model = torch.nn.Sequential()
    model.add_module("encoder", torch.nn.Linear(4, 4))
    model.add_module("classifier", torch.nn.Linear(4, 2))
    groups = training._parameter_groups(model, list(model.parameters()), 1e-5, {"classifier": 1e-3})
    rates = {rate: {id(p) for p in group} for rate, group in ((g["lr"], g["params"]) for g in groups)}
    assert rates == {1e-5: {id(p) for p in model.encoder.parameters()}, 1e-3: {id(p) for p in model.classifier.parameters()}}


def test_length_grouping_visits_every_row_once_in_batches_of_similar_length_and_resumes_like_an_unbroken_run():
    lengths = np.random.default_rng(0).integers(3, 120, size=1000)

    def epochs(source: training.Shuffled, count: int) -> list[list[np.ndarray]]:
        return [[batch.inputs["rows"] for batch in source.epoch(e)] for e in range(1, count + 1)]

    def make(rows, _epoch):
        return training.Batch({"rows": rows}, torch.zeros(len(rows)))

    grouped = training.Shuffled(1000, 16, seed=3, make=make, lengths=lengths)
    plain = training.Shuffled(1000, 16, seed=3, make=make)
    first, second = epochs(grouped, 2)
    assert len(first) == grouped.steps_per_epoch == 63
    assert sorted(np.concatenate(first).tolist()) == list(range(1000))
    assert [len(b) for b in first].count(16) == 62  # only one batch is short
    padded = lambda batches: sum(lengths[b].max() * len(b) for b in batches)  # noqa: E731
    assert padded(first) < 0.6 * padded(epochs(plain, 1)[0])  # far less padding than random batches
    assert not all(np.array_equal(a, b) for a, b in zip(first, second))  # a new order each epoch
    assert np.corrcoef(np.arange(len(first)), [lengths[b].mean() for b in first])[0, 1] < 0.5

    resumed = training.Shuffled(1000, 16, seed=3, make=make, lengths=lengths)
    state = training.Shuffled(1000, 16, seed=3, make=make, lengths=lengths)
    epochs(state, 1)
    resumed.load_state_dict(state.state_dict())
    assert all(np.array_equal(a, b) for a, b in zip(epochs(resumed, 1)[0], second))
    with pytest.raises(ValueError, match="lengths for"):
        training.Shuffled(10, 4, seed=0, make=make, lengths=lengths)
