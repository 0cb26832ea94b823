"""The engine: admission, dynamic batching and the worker that runs the layer loop.

Requests are split into inputs that queue individually (bounded: a full queue refuses
at once). One worker thread gathers up to `max_batch_size` inputs, waiting at most
`max_queue_delay` after the oldest arrived, tokenizes them, and runs the executor.
It waits only while another arrival is expected within that window (from a moving
average of the gaps between arrivals) and stops once two typical gaps pass without
one: a lone client is served at once instead of paying the full delay on every
request, and a burst is batched without waiting out the window after it ended.
Each input's future resolves the moment its row leaves the network, so easy inputs
are answered while the rest of their batch is still running. The event loop never
runs the forward pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from app.engine.continuous import ContinuousBatcher
from app.engine.executor import Prediction, Row, run_batch
from app.engine.runtime import ModelRuntime

log = logging.getLogger(__name__)


class EngineError(Exception):
    """Base of the engine's domain errors."""


class Overloaded(EngineError):
    """The admission queue cannot take the request's inputs now."""


class Draining(EngineError):
    """The engine is shutting down and takes no new work."""


class NotRunning(EngineError):
    """The engine has not started, or its worker has stopped."""


class InferenceFailed(EngineError):
    """The batch holding this input failed; the engine itself keeps running."""


class EngineObserver(Protocol):
    """Receives what the engine did; the metrics module implements it."""

    def answered(
        self, exit_layer: int, num_layers: int, queue_s: float, inference_s: float
    ) -> None: ...

    def layer_steps(self, rows_per_layer: Sequence[int]) -> None: ...

    def load(self, queued: int, inflight: int) -> None: ...


@dataclass(frozen=True)
class Answer:
    label: str
    score: float
    exit_layer: int
    scores: dict[str, float]
    queue_s: float
    inference_s: float


@dataclass(frozen=True)
class ExitRule:
    """A request's exit settings; None means the model's calibrated default."""

    threshold: float | None = None
    max_layers: int | None = None


class _Pending:
    __slots__ = ("admitted", "future", "loop", "rule", "started", "text")

    def __init__(self, text: str, rule: ExitRule, loop: asyncio.AbstractEventLoop) -> None:
        self.text = text
        self.rule = rule
        self.loop = loop
        self.future: asyncio.Future[Answer] = loop.create_future()
        self.admitted = time.perf_counter()
        self.started = 0.0


def _settle(fut: asyncio.Future[Answer], answer: Answer | None, error: Exception | None) -> None:
    if fut.done():  # the client went away and the request was cancelled
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(answer)  # type: ignore[arg-type]


class Engine:
    def __init__(
        self,
        runtime: ModelRuntime,
        max_batch_size: int = 32,
        max_queue_delay_s: float = 0.002,
        max_queue_size: int = 256,
        observer: EngineObserver | None = None,
        continuous: bool = False,
        workers: int = 1,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if continuous and workers > 1:
            raise ValueError("continuous batching runs one worker")
        self.workers = workers
        self.runtime = runtime
        self.continuous = continuous
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self.observer = observer
        self._queue: deque[_Pending] = deque()
        self._inflight = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._draining = False
        self._threads: list[threading.Thread] = []
        self._last_arrival = 0.0
        self._arrival_gap = float("inf")  # moving average of seconds between requests

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        if self._threads:
            raise RuntimeError("engine already started")
        target = self._run_continuous if self.continuous else self._run
        self._threads = [
            threading.Thread(target=target, name=f"exitserve-engine-{i}", daemon=True)
            for i in range(self.workers)
        ]
        for t in self._threads:
            t.start()

    @property
    def running(self) -> bool:
        alive = bool(self._threads) and all(t.is_alive() for t in self._threads)
        return alive and not self._stopping

    @property
    def ready(self) -> bool:
        return self.running and not self._draining

    @property
    def draining(self) -> bool:
        return self._draining

    def begin_drain(self) -> None:
        """Refuse new work from now on; what was admitted still runs."""
        self._draining = True

    def stop(self, timeout: float = 20.0) -> bool:
        """Drain admitted inputs (up to `timeout` seconds), then stop. True if all finished."""
        self._draining = True
        deadline = time.monotonic() + timeout
        with self._cond:
            while (self._queue or self._inflight) and time.monotonic() < deadline:
                self._cond.wait(min(0.05, max(0.0, deadline - time.monotonic())))
            drained = not self._queue and not self._inflight
            self._stopping = True
            leftover = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for p in leftover:
            p.loop.call_soon_threadsafe(_settle, p.future, None, Draining("server shutting down"))
        for t in self._threads:
            t.join(timeout=max(1.0, deadline - time.monotonic()))
        return drained

    # -- admission ---------------------------------------------------------------------
    def queued(self) -> int:
        return len(self._queue)

    async def submit(self, texts: Sequence[str], rule: ExitRule = ExitRule()) -> list[Answer]:
        """Answer every text, in order. Raises Overloaded, Draining or NotRunning at once."""
        L = self.runtime.num_layers
        if rule.max_layers is not None and not 1 <= rule.max_layers <= L:
            raise ValueError(f"max_layers must be in 1..{L}, got {rule.max_layers}")
        if rule.threshold is not None and not 0.0 <= rule.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {rule.threshold}")
        if self._draining:
            raise Draining("server is draining")
        if not self.running:
            raise NotRunning("engine is not running")
        loop = asyncio.get_running_loop()
        items = [_Pending(t, rule, loop) for t in texts]
        with self._cond:
            if len(self._queue) + self._inflight + len(items) > self.max_queue_size:
                raise Overloaded(f"queue full ({self.max_queue_size} inputs)")
            now = items[0].admitted
            if self._last_arrival:
                # A silence longer than the window says nothing about the gaps in a burst.
                gap = min(now - self._last_arrival, self.max_queue_delay_s)
                self._arrival_gap = (
                    gap
                    if self._arrival_gap == float("inf")
                    else (0.8 * self._arrival_gap + 0.2 * gap)
                )
            self._last_arrival = now
            self._queue.extend(items)
            self._cond.notify()
        self._report_load()
        try:
            return list(await asyncio.gather(*(p.future for p in items)))
        except asyncio.CancelledError:
            with self._cond:  # the client left: drop what has not started yet
                for p in items:
                    if not p.started:
                        with contextlib.suppress(ValueError):
                            self._queue.remove(p)
            raise

    # -- worker ------------------------------------------------------------------------
    def _report_load(self) -> None:
        if self.observer is not None:
            self.observer.load(len(self._queue), self._inflight)

    def _take_batch(self) -> list[_Pending] | None:
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            deadline = self._queue[0].admitted + self.max_queue_delay_s
            while len(self._queue) < self.max_batch_size and not self._stopping:
                now = time.perf_counter()
                if self._last_arrival + self._arrival_gap >= deadline:
                    break  # the window closes before the next arrival is due
                # Two typical gaps without an arrival: the burst is over.
                until = min(deadline, self._last_arrival + 2 * self._arrival_gap)
                if until <= now:
                    break
                self._cond.wait(until - now)
            return self._pop(self.max_batch_size)

    def _take_ready(self, limit: int) -> list[_Pending]:
        """What is queued now, without waiting (the batcher has work in hand)."""
        with self._cond:
            return self._pop(limit)

    def _pop(self, limit: int) -> list[_Pending]:
        """Move up to `limit` queued inputs in flight; the caller holds the lock."""
        batch = [self._queue.popleft() for _ in range(min(limit, len(self._queue)))]
        self._inflight += len(batch)
        return batch

    def _rows(self, batch: list[_Pending]) -> list[Row]:
        rt = self.runtime
        L = rt.num_layers
        now = time.perf_counter()
        rows = []
        for p, tokens in zip(batch, rt.tokenize([p.text for p in batch]), strict=True):
            p.started = now
            th = rt.thresholds if p.rule.threshold is None else [p.rule.threshold] * L
            rows.append(Row(tokens, th, p.rule.max_layers or L))
        return rows

    def _answer(self, p: _Pending, pred: Prediction) -> None:
        labels, L = self.runtime.labels, self.runtime.num_layers
        now = time.perf_counter()
        answer = Answer(
            label=labels[pred.label_index],
            score=pred.score,
            exit_layer=pred.exit_layer,
            scores=dict(zip(labels, pred.probs, strict=True)),
            queue_s=p.started - p.admitted,
            inference_s=now - p.started,
        )
        p.loop.call_soon_threadsafe(_settle, p.future, answer, None)
        if self.observer is not None:
            self.observer.answered(pred.exit_layer, L, answer.queue_s, answer.inference_s)

    def _finish(self, n: int) -> None:
        with self._cond:
            self._inflight -= n
            self._cond.notify_all()

    @staticmethod
    def _reject(p: _Pending) -> None:
        p.loop.call_soon_threadsafe(_settle, p.future, None, InferenceFailed("inference failed"))

    def _fail(self, p: _Pending, error: Exception) -> None:
        self._reject(p)
        self._finish(1)

    def _run_continuous(self) -> None:
        batcher: ContinuousBatcher[_Pending] = ContinuousBatcher(
            self.runtime.network, self.max_batch_size
        )

        def answered(p: _Pending, pred: Prediction) -> None:
            self._answer(p, pred)
            self._finish(1)

        while True:
            if len(batcher):
                batch = self._take_ready(self.max_batch_size)
            else:
                taken = self._take_batch()
                if taken is None:
                    return
                batch = taken
            if batch:
                try:
                    batcher.add(self._rows(batch), batch)
                except Exception as e:
                    log.exception("admitting %d inputs failed", len(batch))
                    for p in batch:
                        self._fail(p, e)
                self._report_load()
            rows = batcher.step(answered, self._fail)
            if rows and self.observer is not None:
                self.observer.layer_steps([rows])
            if rows:
                self._report_load()

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            self._report_load()
            try:
                self._run_batch(batch)
            except Exception:
                log.exception("batch of %d inputs failed", len(batch))
                for p in batch:
                    self._reject(p)  # those already answered keep their answer
            finally:
                self._finish(len(batch))
                self._report_load()

    def _run_batch(self, batch: list[_Pending]) -> None:
        rows = self._rows(batch)
        result = run_batch(self.runtime.network, rows, lambda i, p: self._answer(batch[i], p))
        if self.observer is not None:
            self.observer.layer_steps(result.rows_per_layer)
