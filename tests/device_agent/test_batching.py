"""The dynamic batcher: concurrent requests share model runs and each gets its own rows back."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from device_agent.batching import BatchingError, DynamicBatcher


class RecordingModel:
    """y = 2x + row-sum, with every call's batch size recorded; slow enough for requests to pile up."""

    def __init__(self, seconds: float = 0.01) -> None:
        self.seconds = seconds
        self.batch_rows: list[int] = []
        self._lock = threading.Lock()

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            self.batch_rows.append(feeds["x"].shape[0])
        time.sleep(self.seconds)
        x = feeds["x"]
        return {"y": x * 2, "total": x.reshape(x.shape[0], -1).sum(axis=1)}


async def _submit_all(batcher: DynamicBatcher, requests: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    return await asyncio.gather(*(batcher.submit(feeds) for feeds in requests))


def _requests(count: int, rows: int = 1, width: int = 4) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{"x": rng.normal(size=(rows, width)).astype(np.float32)} for _ in range(count)]


def _assert_answers(requests, answers) -> None:
    for feeds, answer in zip(requests, answers):
        np.testing.assert_array_equal(answer["y"], feeds["x"] * 2)
        np.testing.assert_allclose(answer["total"], feeds["x"].sum(axis=1), rtol=1e-6)


def test_concurrent_requests_share_runs_and_get_their_own_rows():
    model = RecordingModel()
    batcher = DynamicBatcher(model, max_batch=8, max_delay_ms=20)
    requests = _requests(32)
    answers = asyncio.run(_submit_all(batcher, requests))
    _assert_answers(requests, answers)
    assert len(model.batch_rows) < len(requests)
    assert sum(model.batch_rows) == 32
    assert max(model.batch_rows) <= 8
    stats = batcher.stats
    assert (stats.exec_count, stats.inference_count, stats.pending) == (len(model.batch_rows), 32, 0)
    assert stats.queue_duration_us > 0 and stats.compute_infer_duration_us > 0


def test_multi_row_requests_are_not_split_and_fill_batches_by_rows():
    model = RecordingModel()
    batcher = DynamicBatcher(model, max_batch=8, max_delay_ms=20)
    requests = _requests(6, rows=3)
    answers = asyncio.run(_submit_all(batcher, requests))
    _assert_answers(requests, answers)
    assert all(rows % 3 == 0 and rows <= 8 for rows in model.batch_rows)
    assert len(model.batch_rows) < 6


def test_a_request_larger_than_max_batch_runs_alone():
    model = RecordingModel()
    batcher = DynamicBatcher(model, max_batch=4, max_delay_ms=5)
    requests = _requests(1, rows=10) + _requests(2)
    answers = asyncio.run(_submit_all(batcher, requests))
    _assert_answers(requests, answers)
    assert 10 in model.batch_rows


def test_requests_with_different_inner_dimensions_run_separately():
    model = RecordingModel()
    batcher = DynamicBatcher(model, max_batch=16, max_delay_ms=20)
    requests = _requests(4, width=4) + _requests(4, width=6) + [{"x": np.ones((1, 4), np.float64)}]
    answers = asyncio.run(_submit_all(batcher, requests))
    _assert_answers(requests, answers)
    assert sorted(model.batch_rows) == [1, 4, 4]


def test_max_batch_one_runs_every_request_alone():
    model = RecordingModel(seconds=0)
    batcher = DynamicBatcher(model, max_batch=1, max_delay_ms=50)
    requests = _requests(5)
    started = time.monotonic()
    answers = asyncio.run(_submit_all(batcher, requests))
    _assert_answers(requests, answers)
    assert model.batch_rows == [1] * 5
    assert time.monotonic() - started < 0.25, "a full batch must not wait for the delay"


def test_a_lone_request_waits_at_most_the_delay():
    batcher = DynamicBatcher(RecordingModel(seconds=0), max_batch=64, max_delay_ms=30)

    async def one() -> float:
        started = time.monotonic()
        await batcher.submit(_requests(1)[0])
        return time.monotonic() - started

    assert 0.02 <= asyncio.run(one()) < 0.5


def test_a_failing_run_fails_every_request_of_its_batch():
    def broken(feeds):
        raise RuntimeError("the accelerator fell off")

    batcher = DynamicBatcher(broken, max_batch=8, max_delay_ms=20)

    async def run_all():
        return await asyncio.gather(*(batcher.submit(feeds) for feeds in _requests(5)), return_exceptions=True)

    results = asyncio.run(run_all())
    assert all(isinstance(result, RuntimeError) and "fell off" in str(result) for result in results)
    assert batcher.stats.pending == 0


def test_outputs_without_a_batch_dimension_fail_the_batch_clearly():
    batcher = DynamicBatcher(lambda feeds: {"mean": np.float32(feeds["x"].mean())}, max_batch=8, max_delay_ms=20)

    async def run_all():
        return await asyncio.gather(*(batcher.submit(feeds) for feeds in _requests(3)), return_exceptions=True)

    results = asyncio.run(run_all())
    assert all(isinstance(result, BatchingError) for result in results)


def test_a_cancelled_request_does_not_disturb_the_others():
    model = RecordingModel()
    batcher = DynamicBatcher(model, max_batch=8, max_delay_ms=30)
    requests = _requests(4)

    async def run_all():
        tasks = [asyncio.create_task(batcher.submit(feeds)) for feeds in requests]
        await asyncio.sleep(0.005)
        tasks[1].cancel()
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(run_all())
    assert isinstance(results[1], asyncio.CancelledError)
    kept = [0, 2, 3]
    _assert_answers([requests[i] for i in kept], [results[i] for i in kept])
    assert sum(model.batch_rows) == 3
    assert batcher.stats.pending == 0


def test_the_batcher_keeps_working_across_event_loops():
    model = RecordingModel(seconds=0)
    batcher = DynamicBatcher(model, max_batch=8, max_delay_ms=1)
    for _ in range(2):
        requests = _requests(3)
        _assert_answers(requests, asyncio.run(_submit_all(batcher, requests)))


def test_batched_onnx_runtime_matches_one_by_one(tmp_path: Path):
    """With the real tiny classifier: batching changes how many runs happen, not the answers."""
    import onnxruntime

    from tests.support.bundles import write_tiny_classifier

    session = onnxruntime.InferenceSession(str(write_tiny_classifier(tmp_path)), providers=["CPUExecutionProvider"])
    calls: list[int] = []

    def run(feeds):
        calls.append(feeds["x"].shape[0])
        return {"logits": session.run(["logits"], feeds)[0]}

    batcher = DynamicBatcher(run, max_batch=8, max_delay_ms=20)
    requests = _requests(16, rows=2)
    answers = asyncio.run(_submit_all(batcher, requests))
    for feeds, answer in zip(requests, answers):
        (alone,) = session.run(["logits"], feeds)
        np.testing.assert_allclose(answer["logits"], alone, rtol=1e-5, atol=1e-6)
    assert len(calls) < 16


@pytest.mark.parametrize("max_batch", [0, -1])
def test_max_batch_must_be_positive(max_batch: int):
    with pytest.raises(ValueError, match="max_batch"):
        DynamicBatcher(lambda feeds: feeds, max_batch=max_batch, max_delay_ms=1)


def test_a_model_gated_one_row_per_run_is_never_joined_with_other_requests():
    """Dynamic int8 answers depend on the rows a run holds: the bundle says so and the agent does not join requests."""
    from device_agent.bundle import RuntimeInfo
    from device_agent.server import joined_rows
    from tests.support.bundles import tiny_manifest

    manifest = tiny_manifest()
    assert joined_rows(manifest, 8) == 8
    one_row = manifest.model_copy(update={"runtime": RuntimeInfo(engine="onnxruntime", execution_providers=["CPUExecutionProvider"],
                                                                 model_file="model.onnx", max_rows_per_run=1)})
    assert joined_rows(one_row, 8) == 1
    fixed = manifest.model_copy(update={"inputs": [manifest.inputs[0].model_copy(update={"shape": [1, 4]})]})
    assert joined_rows(fixed, 8) == 1  # a fixed first dimension cannot be joined at all


def test_a_request_of_several_rows_runs_each_row_alone_without_its_padding():
    from device_agent.bundle import RuntimeInfo
    from device_agent.server import rows_run_alone
    from tests.support.bundles import tiny_manifest

    manifest = tiny_manifest()
    feeds = {"input_ids": np.array([[101, 7, 8, 102], [101, 9, 102, 0]]), "attention_mask": np.array([[1, 1, 1, 1], [1, 1, 1, 0]]),
             "token_type_ids": np.zeros((2, 4), np.int64)}
    assert rows_run_alone(manifest, feeds) is None  # batch-invariant models run a request as it comes
    one_row = manifest.model_copy(update={"runtime": RuntimeInfo(engine="onnxruntime", execution_providers=["CPUExecutionProvider"],
                                                                 model_file="model.onnx", max_rows_per_run=1)})
    first, second = rows_run_alone(one_row, feeds)
    assert first["input_ids"].tolist() == [[101, 7, 8, 102]]
    assert second["input_ids"].tolist() == [[101, 9, 102]] and second["attention_mask"].tolist() == [[1, 1, 1]]
    assert second["token_type_ids"].shape == (1, 3)
    assert rows_run_alone(one_row, {name: value[:1] for name, value in feeds.items()}) is None  # one row: as it comes
