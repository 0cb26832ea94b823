"""The engine's worker threads: take a batch, run it through the backend, answer each
input the moment it leaves, report the work to the load controller.

`WorkerLoops` holds the loops; `scheduler.Engine` holds the queue, admission and
lifecycle they share, and inherits them. Static batches (`_run`) or layer-wise
continuous batching (`_run_continuous`, one worker).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

import torch

from app.engine.adapt import LoadController
from app.engine.audit import Audit
from app.engine.continuous import ContinuousBatcher
from app.engine.errors import DeadlineExceeded, InferenceFailed, InputTooLong
from app.engine.executor import run_batch
from app.engine.policy import batch_wait, borrows_idle_threads
from app.engine.requests import Answer, EngineObserver, Pending, settle
from app.engine.runtime import ModelRuntime
from app.network.exit_rule import Prediction, Row
from app.network.tokenizer import TooLong

log = logging.getLogger(__name__)

AUDIT_BACKLOG = 32  # audits waiting that a busy worker runs between two batches


class WorkerLoops:
    """The worker side of `scheduler.Engine` (the state below is the engine's)."""

    runtime: ModelRuntime
    max_batch_size: int
    max_queue_delay_s: float
    observer: EngineObserver | None
    controller: LoadController | None
    audit: Audit | None
    _audits: deque[tuple[list[int], int]]  # (token ids, exit served) to audit
    _queue: deque[Pending]
    _inflight: int
    _cond: threading.Condition
    _stopping: bool
    _threads: list[threading.Thread]
    _dead: set[int]
    _busy_since: list[float | None]
    _last_arrival: float
    _arrival_gap: float
    _arrival_load: float

    def _report_load(self) -> None:
        if self.observer is not None:
            self.observer.load(len(self._queue), self._inflight)

    def _take_batch(self) -> list[Pending] | None:
        """The next batch (never empty), or None once the engine stops."""
        with self._cond:
            while True:
                while not self._queue and not self._stopping:
                    if self._audits:
                        return []  # nothing to answer: audit what waits
                    self._cond.wait(self._next_check())
                    self._update_point()
                if self._stopping:
                    return None
                first = self._queue[0].admitted
                while len(self._queue) < self.max_batch_size and not self._stopping:
                    wait = batch_wait(
                        time.perf_counter(),
                        first,
                        self._last_arrival,
                        self._arrival_gap,
                        self.max_queue_delay_s,
                        idle_workers=sum(t is None for t in self._busy_since),
                    )
                    if wait <= 0.0:
                        break
                    self._cond.wait(wait)
                batch = self._pop(self.max_batch_size)
                if batch:
                    return batch

    def _next_check(self) -> float | None:
        """How long a worker may sleep before the controller wants an update; the
        caller holds the lock."""
        c = self.controller
        return None if c is None else c.next_check(time.monotonic())

    def _update_point(self) -> None:
        """Let the controller choose its point for the current load; the caller holds
        the lock."""
        if self.controller is not None:
            self.controller.update(len(self._queue) + self._inflight, time.monotonic())

    def _measured(self, inputs: int, layers_run: int, seconds: float) -> None:
        """A worker spent `seconds` on `inputs` new inputs and `layers_run` row-layers."""
        c = self.controller
        if c is None:
            return
        with self._cond:
            c.observe(c.work(inputs, layers_run), seconds)
            self._update_point()

    def _take_ready(self, limit: int) -> list[Pending]:
        """What is queued now, without waiting (the batcher has work in hand)."""
        with self._cond:
            return self._pop(limit)

    def _pop(self, limit: int) -> list[Pending]:
        """Move up to `limit` queued inputs in flight; the caller holds the lock.

        Inputs whose deadline has passed are dropped here, so they never reach the network.
        """
        now = time.perf_counter()
        batch: list[Pending] = []
        expired = False
        while self._queue and len(batch) < limit:
            p = self._queue.popleft()
            if p.deadline < now:
                expired = True
                p.loop.call_soon_threadsafe(
                    settle, p.future, None, DeadlineExceeded("deadline passed while queued")
                )
            else:
                p.taken = True
                batch.append(p)
        self._inflight += len(batch)
        if expired:
            self._cond.notify_all()  # stop() waits for the queue to empty
        return batch

    def _point(self) -> tuple[int, Sequence[float]]:
        """The operating point a batch starting now runs at, and its thresholds (as the
        audit has tightened them)."""
        c = self.controller
        thresholds: Sequence[float]
        if c is None:
            k, thresholds = 0, self.runtime.thresholds
        else:
            with self._cond:
                k = c.point
            thresholds = c.ladder.points[k].thresholds
        return k, thresholds if self.audit is None else self.audit.apply(thresholds)

    def _rows(self, batch: list[Pending]) -> tuple[list[Row], list[Pending]]:
        """The batch's rows, and the inputs they are: an input over the model's limit
        whose request forbade truncation is refused here (InputTooLong) and left out."""
        rt = self.runtime
        L = rt.num_layers
        point, point_thresholds = self._point()
        now = time.perf_counter()
        rows, kept = [], []
        encoded = rt.tokenize_as_asked([p.text for p in batch], [p.truncation for p in batch])
        for p, tokens in zip(batch, encoded, strict=True):
            if isinstance(tokens, TooLong):
                error = InputTooLong(tokens.length, tokens.limit)
                p.loop.call_soon_threadsafe(settle, p.future, None, error)
                continue
            p.started, p.tokens = now, tokens
            # A request's own rule is kept whatever the load (no operating point).
            p.point = point if p.rule.default else None
            th = p.rule.thresholds(rt.thresholds, point_thresholds)
            rows.append(Row(tokens, th, p.rule.max_layers or L))
            kept.append(p)
        return rows, kept

    def _answer(self, p: Pending, pred: Prediction) -> None:
        labels, L = self.runtime.labels, self.runtime.num_layers
        now = time.perf_counter()
        answer = Answer(
            label=labels[pred.label_index],
            score=pred.score,
            exit_layer=pred.exit_layer,
            scores=dict(zip(labels, pred.probs, strict=True)),
            queue_s=p.started - p.admitted,
            inference_s=now - p.started,
            operating_point=p.point,
            logits=pred.logits,
        )
        # Counted before the caller can hold the answer, so /metrics never lags it.
        if self.observer is not None:
            self.observer.answered(pred.exit_layer, L, answer.queue_s, answer.inference_s)
        p.loop.call_soon_threadsafe(settle, p.future, answer, None)
        a = self.audit
        # Answered first: the audit costs the answer nothing. Only answers at the
        # model's own exits keep (or break) its promise.
        if a is not None and p.rule.default and a.wants(not self._queue, bool(p.point)):
            # None while short of capacity: below point 0 (`wants`), or refusing new work.
            c, queued = self.controller, len(self._queue) + self._inflight
            if c is None or c.refusal(queued, 1, None) is None:
                with self._cond:
                    self._audits.append((p.tokens, pred.exit_layer))
                    self._cond.notify()

    def _finish(self, n: int) -> None:
        with self._cond:
            self._inflight -= n
            if not self._inflight:
                # Only stop() waits for flight to end; waking the other workers (who wait
                # on the same condition for work) at every answer would only cost them.
                self._cond.notify_all()

    @staticmethod
    def _reject(p: Pending) -> None:
        p.loop.call_soon_threadsafe(settle, p.future, None, InferenceFailed("inference failed"))

    def _fail(self, p: Pending, error: Exception) -> None:
        self._reject(p)
        self._finish(1)

    def _work(self, i: int, target: Callable[[int], None]) -> None:
        try:
            target(i)
            if not self._stopping:
                raise RuntimeError("engine worker returned while the engine runs")
        except BaseException:
            # Only a bug gets here (a batch's errors are caught with the batch). `failed`
            # now tells the health probes; fail what waits if no worker is left to run it.
            # The death is marked before anyone is failed, so a caller that sees its
            # InferenceFailed also sees `failed`, even while this thread is still ending.
            log.critical("engine worker %d died", i, exc_info=True)
            with self._cond:
                self._dead.add(i)
                if len(self._dead) < len(self._threads):
                    return
                leftover = list(self._queue)
                self._queue.clear()
                self._cond.notify_all()
            for p in leftover:
                self._reject(p)

    def _run_continuous(self, i: int) -> None:
        batcher: ContinuousBatcher[Pending] = ContinuousBatcher(
            self.runtime.backend, self.max_batch_size
        )

        def answered(p: Pending, pred: Prediction) -> None:
            self._answer(p, pred)
            self._finish(1)

        # The controller's cost model counts batches: L layer steps (about one batch's
        # worth, and a batch's worth of per-step overhead) are reported as one.
        steps, inputs, layers_run, busy = 0, 0, 0, 0.0
        while True:
            if len(batcher):
                batch = self._take_ready(self.max_batch_size)
            else:
                taken = self._take_batch()
                if taken is None:
                    return
                if not taken:
                    self._audit_safely()
                    continue
                batch = taken
            began = self._busy_since[i] = time.monotonic()
            if batch:
                try:
                    admitted, kept = self._rows(batch)
                    if len(kept) < len(batch):  # refused: out of flight
                        self._finish(len(batch) - len(kept))
                    if admitted:
                        batcher.add(admitted, kept)
                except Exception as e:
                    log.exception("admitting %d inputs failed", len(batch))
                    for p in batch:
                        self._fail(p, e)
                self._report_load()
            rows = batcher.step(answered, self._fail)
            steps, inputs, layers_run = steps + 1, inputs + len(batch), layers_run + rows
            busy += time.monotonic() - began
            if steps >= self.runtime.num_layers or not len(batcher):
                self._measured(inputs, layers_run, busy)
                steps, inputs, layers_run, busy = 0, 0, 0, 0.0
            if rows and self.observer is not None:
                self.observer.layer_steps([rows])
            self._busy_since[i] = None  # after the metrics: `idle` waits for both
            if rows:
                self._report_load()

    def _run_audits(self, limit: int = 16) -> None:
        """Run up to `limit` queued audits through every exit and hand them to the audit."""
        with self._cond:
            items = [self._audits.popleft() for _ in range(min(limit, len(self._audits)))]
        if not items or self.audit is None:
            return
        with torch.inference_mode():
            logits = self.runtime.backend.all_exits([ids for ids, _ in items])  # (L, B, C)
        backend = self.runtime.backend
        probs = backend.probabilities(logits).cpu().numpy()
        disagreed = 0
        for j, (_, served) in enumerate(items):
            differed, move = self.audit.record(probs[:, j], served, backend.confidence)
            disagreed += differed
            if move is not None and self.observer is not None:
                self.observer.threshold_moved(move)
        if self.observer is not None:
            self.observer.audited(len(items), disagreed, len(items) * self.runtime.num_layers)

    def _run(self, i: int) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            if not batch:
                self._audit_safely()
                continue
            began = self._busy_since[i] = time.monotonic()
            answered = [0]  # inputs of this batch answered, and so already out of flight
            try:
                self._report_load()
                layers_run = self._run_batch(batch, answered, self._alone(i))
                self._measured(len(batch), layers_run, time.monotonic() - began)
            except Exception:
                log.exception("batch of %d inputs failed", len(batch))
                for p in batch:
                    self._reject(p)  # those already answered keep their answer
            finally:
                self._busy_since[i] = None
                self._finish(len(batch) - answered[0])
                self._report_load()
            if len(self._audits) >= AUDIT_BACKLOG:  # busy without a pause: audit some
                self._audit_safely()

    def _audit_safely(self) -> None:
        try:
            self._run_audits()
        except Exception:
            log.exception("an audit batch failed")  # answers were given: nothing to fail

    def _alone(self, i: int) -> bool:
        """Whether worker i, which has just taken a batch, may give a row alone the idle
        workers' threads too (`borrows_idle_threads`)."""
        others_busy = any(t is not None for j, t in enumerate(self._busy_since) if j != i)
        return borrows_idle_threads(self._arrival_load, len(self._queue), others_busy)

    def _run_batch(self, batch: list[Pending], answered: list[int], wide: bool = False) -> int:
        """Run one batch to its last answer; how many row-layers it ran. `wide`: a row
        alone may use the threads of idle workers."""

        def on_answer(i: int, pred: Prediction) -> None:
            self._answer(batch[i], pred)
            # Out of flight at once: an input that left at layer 1 frees its place in
            # the queue's bound while the rest of its batch still runs.
            self._finish(1)
            answered[0] += 1

        rows, kept = self._rows(batch)
        refused = len(batch) - len(kept)
        if refused:  # out of flight: answered with their error
            self._finish(refused)
            answered[0] += refused
            batch = kept
        if not rows:
            return 0
        whole = self.runtime.plan(len(rows)) == "whole"
        result = run_batch(self.runtime.backend, rows, on_answer, wide, whole)
        if self.observer is not None:
            self.observer.layer_steps(result.rows_per_layer)
        return sum(result.rows_per_layer)
