"""Dynamic batching: requests that arrive close together share one model run.

Requests are joined along dimension 0. A batch closes when it holds
``max_batch`` rows or when its oldest request has waited ``max_delay_ms``; it then
runs as ONE call in a worker thread, and the outputs are split back by rows.
Only requests whose tensors agree on every other dimension and dtype are
joined; the others wait for a batch of their own. While a batch runs, new
requests queue, so a busy model batches more, an idle one answers at once.

The batcher lives on one asyncio event loop. Its worker task exists only while
requests wait, so it needs no start or stop.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

Tensors = dict[str, np.ndarray]


class BatchingError(Exception):
    """A model's outputs cannot be split back into the requests of a batch (an internal error)."""


@dataclass
class BatchStats:
    """Counters in Triton's terms; cumulative, so a replaced batcher keeps counting where the old one stopped."""

    exec_count: int = 0  # model runs
    inference_count: int = 0  # rows inferred, over all runs
    queue_duration_us: int = 0  # summed over requests: arrival → start of their run
    compute_infer_duration_us: int = 0  # summed over runs
    pending: int = 0  # requests submitted and not yet answered


@dataclass
class _Waiting:
    feeds: Tensors
    rows: int
    shape_key: object  # requests may be joined only when their keys are equal
    arrived: float
    answer: asyncio.Future = field(repr=False)


class _Unbatchable:
    """A key equal to nothing else: for requests whose inputs disagree on dimension 0."""


def _shape_key(feeds: Tensors) -> tuple[int, object]:
    """Rows of the request, and what must match for two requests to be joined."""
    rows = {array.shape[0] if array.ndim else None for array in feeds.values()}
    if len(rows) != 1 or None in rows:
        return 1, _Unbatchable()
    key = tuple(sorted((name, array.dtype.str, array.shape[1:]) for name, array in feeds.items()))
    return rows.pop(), key


def _join(batch: list[_Waiting]) -> Tensors:
    if len(batch) == 1:
        return batch[0].feeds
    return {name: np.concatenate([request.feeds[name] for request in batch]) for name in batch[0].feeds}


def _split(outputs: Tensors, batch: list[_Waiting]) -> list[Tensors]:
    if len(batch) == 1:
        return [outputs]
    total = sum(request.rows for request in batch)
    for name, array in outputs.items():
        if array.ndim == 0 or array.shape[0] != total:
            raise BatchingError(f"output {name!r} has shape {array.shape} for a batch of {total} rows; this model cannot be batched")
    offsets = np.cumsum([request.rows for request in batch])[:-1]
    pieces = {name: np.split(array, offsets) for name, array in outputs.items()}
    return [{name: pieces[name][index] for name in outputs} for index in range(len(batch))]


class DynamicBatcher:
    """Queue requests and run them in batches of up to ``max_batch`` rows through ``run``."""

    def __init__(
        self,
        run: Callable[[Tensors], Tensors],
        max_batch: int,
        max_delay_ms: float,
        stats: BatchStats | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.run = run
        self.max_batch = max_batch
        self.max_delay_s = max(max_delay_ms, 0.0) / 1000
        self.stats = stats if stats is not None else BatchStats()
        self._waiting: deque[_Waiting] = deque()
        self._worker: asyncio.Task | None = None
        self._arrival: asyncio.Event | None = None

    async def submit(self, feeds: Tensors) -> Tensors:
        """Run ``feeds`` (possibly together with other requests) and return this request's outputs."""
        rows, key = _shape_key(feeds)
        request = _Waiting(feeds, rows, key, time.monotonic(), asyncio.get_running_loop().create_future())
        self._waiting.append(request)
        self.stats.pending += 1
        if self._worker is None:
            self._worker = asyncio.create_task(self._work())
        elif self._arrival is not None:
            self._arrival.set()
        try:
            return await request.answer
        finally:
            self.stats.pending -= 1

    async def _work(self) -> None:
        self._arrival = asyncio.Event()
        try:
            while self._drop_abandoned():
                batch = await self._collect()
                await self._execute(batch)
        except asyncio.CancelledError:
            # The loop is shutting down: nobody will run what still waits.
            for request in self._waiting:
                request.answer.cancel()
            self._waiting.clear()
            raise
        finally:
            # No await between the empty check above and here, so a submit
            # either saw this worker running or sees None and starts another.
            self._worker = self._arrival = None

    def _drop_abandoned(self) -> bool:
        """Forget requests whose callers went away; whether any request still waits."""
        while self._waiting and self._waiting[0].answer.done():
            self._waiting.popleft()
        return bool(self._waiting)

    async def _collect(self) -> list[_Waiting]:
        """Wait until the oldest request's batch is full or its delay has passed; take that batch."""
        first = self._waiting[0]
        deadline = first.arrived + self.max_delay_s
        while self._joinable_rows(first) < self.max_batch:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._arrival.clear()
            try:
                await asyncio.wait_for(self._arrival.wait(), remaining)
            except asyncio.TimeoutError:
                break
        return self._take(first)

    def _joinable_rows(self, first: _Waiting) -> int:
        return sum(request.rows for request in self._waiting if request.shape_key == first.shape_key)

    def _take(self, first: _Waiting) -> list[_Waiting]:
        """The oldest request and those after it that fit with it, in arrival order; the rest keep waiting."""
        batch, rows, rest = [first], first.rows, deque()
        for request in list(self._waiting)[1:]:
            fits = request.shape_key == first.shape_key and rows + request.rows <= self.max_batch
            if fits and not request.answer.done():
                batch.append(request)
                rows += request.rows
            elif not request.answer.done():
                rest.append(request)
        self._waiting = rest
        return batch

    async def _execute(self, batch: list[_Waiting]) -> None:
        started = time.monotonic()
        self.stats.queue_duration_us += sum(int((started - request.arrived) * 1e6) for request in batch)
        try:
            outputs = await asyncio.to_thread(self.run, _join(batch))
            answers = _split(outputs, batch)
        except Exception as error:  # the model's failure is each request's failure
            for request in batch:
                if not request.answer.done():
                    request.answer.set_exception(error)
            return
        except asyncio.CancelledError:
            for request in batch:
                request.answer.cancel()
            raise
        finally:
            self.stats.exec_count += 1
            self.stats.inference_count += sum(request.rows for request in batch)
            self.stats.compute_infer_duration_us += int((time.monotonic() - started) * 1e6)
        for request, answer in zip(batch, answers):
            if not request.answer.done():
                request.answer.set_result(answer)
