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

Load: with a `LoadController` (app.engine.adapt), inputs that keep the model's default
exits take the thresholds of the controller's operating point when their batch
begins, and a request whose expected latency, even at the controller's floor,
exceeds its budget is refused at once (Overloaded, with a retry delay). The worker
reports every batch's busy time and work to the controller, and wakes it while it is
below point 0 so that it climbs back even when no traffic comes.

Deadlines: an input whose deadline passes while it waits in the queue is dropped when
a worker next takes a batch, before any compute, and its request fails with
DeadlineExceeded; the caller also stops waiting at the deadline. An input already in
a batch at its deadline is allowed to finish. Faults: an exception inside a batch
fails only that batch's inputs. Each worker notes when its current batch began, so a
batch running past `stuck_after_s` (or a dead worker) turns `ready` false.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from asyncio import FIRST_EXCEPTION
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from app.engine.adapt import LoadController
from app.engine.continuous import ContinuousBatcher
from app.engine.executor import run_batch
from app.engine.runtime import ModelRuntime
from app.network.exit_rule import ExitRule, Prediction, Row

log = logging.getLogger(__name__)

CALIBRATED = ExitRule()  # the model's own exits, left to the load controller


class EngineError(Exception):
    """Base of the engine's domain errors."""


class Overloaded(EngineError):
    """The engine cannot take the request's inputs now: its queue is full, or it could
    not answer them within their budget."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s  # when a retry could be served in time


class TooLate(Overloaded):
    """The queue has room, but the load controller expects the request's inputs to be
    answered only after its budget, even at the lowest operating point allowed."""


class Draining(EngineError):
    """The engine is shutting down and takes no new work."""


class NotRunning(EngineError):
    """The engine has not started, or its worker has stopped."""


class InferenceFailed(EngineError):
    """The batch holding this input failed; the engine itself keeps running."""


class DeadlineExceeded(EngineError):
    """The request's deadline passed before all of its inputs could start."""


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
    # The load controller's operating point the input was served at (0: calibrated);
    # None when the request chose its own threshold or depth cap.
    operating_point: int | None = 0


class _Pending:
    __slots__ = (
        "admitted",
        "deadline",
        "future",
        "loop",
        "point",
        "rule",
        "started",
        "taken",
        "text",
    )

    def __init__(
        self, text: str, rule: ExitRule, loop: asyncio.AbstractEventLoop, deadline: float
    ) -> None:
        self.text = text
        self.rule = rule
        self.loop = loop
        self.future: asyncio.Future[Answer] = loop.create_future()
        self.admitted = time.perf_counter()
        self.deadline = deadline  # perf_counter time; inf: none
        self.taken = False  # in a batch: it will run to its answer
        self.started = 0.0
        self.point: int | None = 0  # operating point its batch ran it at


def next_arrival_gap(average: float, gap: float, window: float) -> float:
    """The moving average of seconds between arrivals, after one more `gap`.

    A silence longer than the batching window says nothing about the gaps in a burst, so
    it counts as twice the window: clearly past it, and not so long that the average
    stays there once a burst begins. (Counted as exactly the window, one short gap left
    the average below the window for good, since it can only approach the cap: a lone
    client then waited out the whole window on every request.)
    """
    gap = min(gap, 2.0 * window)
    return gap if average == float("inf") else 0.8 * average + 0.2 * gap


def batch_wait(
    now: float,
    first: float,
    last_arrival: float,
    gap: float,
    window: float,
    idle_workers: int = 1,
) -> float:
    """Seconds worth waiting for one more arrival before closing a batch (<= 0: close now).

    `first` is when the oldest queued input arrived, `last_arrival` the latest, `gap` the
    average gap between arrivals. Wait only while the next arrival is due before the
    window closes, and never past two typical gaps without one (the burst is over).
    Never while another worker is idle (`idle_workers` counts the asking one): it would
    start the next arrival at once, so holding this batch back only idles a core; on
    the CPU a bigger batch saves little per row (about 10% from 1 to 8 rows).
    """
    if idle_workers > 1:
        return 0.0
    deadline = first + window
    if last_arrival + gap >= deadline:
        return 0.0  # the window closes before the next arrival is due
    return min(deadline, last_arrival + 2.0 * gap) - now


def borrows_idle_threads(arrival_load: float, queued: int, others_busy: bool) -> bool:
    """Whether a row alone may take the idle workers' threads as well as its own.

    Only with nothing queued, no other worker at work, and traffic so sparse that
    arrivals find the engine empty (`arrival_load`, a moving average of the inputs an
    arrival finds admitted, under half an input). On 2 cores a row alone in one call on
    two threads measured 1.29x one thread in process, and 1.16x the requests over HTTP at
    one client; at 16 clients, going wide whenever the other worker happened to be idle
    served 11% fewer: the next arrival soon wanted that core back.
    """
    return arrival_load < 0.5 and not queued and not others_busy


def _settle(fut: asyncio.Future[Answer], answer: Answer | None, error: Exception | None) -> None:
    if fut.done():  # the client went away and the request was cancelled
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(answer)  # type: ignore[arg-type]


def _raise_first_error(futures: list[asyncio.Future[Answer]]) -> None:
    for f in futures:
        if f.done() and not f.cancelled() and f.exception() is not None:
            raise f.exception()  # type: ignore[misc]


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
        stuck_after_s: float = 30.0,
        controller: LoadController | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if stuck_after_s <= 0:
            raise ValueError(f"stuck_after_s must be > 0, got {stuck_after_s}")
        if continuous and workers > 1:
            raise ValueError("continuous batching runs one worker")
        self.workers = workers
        self.runtime = runtime
        self.continuous = continuous
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self.observer = observer
        self.stuck_after_s = stuck_after_s
        self._queue: deque[_Pending] = deque()
        self._inflight = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._draining = False
        self._drain_began = 0.0  # time.monotonic() of the first begin_drain()
        self._threads: list[threading.Thread] = []
        self._dead: set[int] = set()  # workers that died; marked before they fail what waits
        self._busy_since: list[float | None] = [None] * workers  # monotonic, per worker
        self._last_arrival = 0.0
        self._arrival_gap = float("inf")  # moving average of seconds between requests
        self._arrival_load = 0.0  # moving average of the inputs an arrival finds admitted
        self.controller = controller  # guarded by _cond, like the queue

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        if self._threads:
            raise RuntimeError("engine already started")
        target = self._run_continuous if self.continuous else self._run
        self._threads = [
            threading.Thread(
                target=self._work, args=(i, target), name=f"exitserve-engine-{i}", daemon=True
            )
            for i in range(self.workers)
        ]
        for t in self._threads:
            t.start()

    @property
    def running(self) -> bool:
        # Asked on every request: flags, not Thread.is_alive() (5% of the event loop at
        # 16 clients). A worker only ends by stop() or by dying, and `_work` marks a death.
        return bool(self._threads) and not self._dead and not self._stopping

    @property
    def failed(self) -> bool:
        """A worker died: this engine cannot recover (the process should be restarted)."""
        return bool(self._dead) and not self._stopping

    @property
    def stuck(self) -> bool:
        """A batch has been running for longer than `stuck_after_s`."""
        now = time.monotonic()
        return any(t is not None and now - t > self.stuck_after_s for t in self._busy_since)

    @property
    def ready(self) -> bool:
        return self.running and not self._draining and not self.stuck

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def idle(self) -> bool:
        """Nothing queued, nothing in flight, and no worker still finishing a batch.

        An input answered early leaves flight at once, before its batch's remaining layers
        and metrics (batch sizes) are done: a busy worker is not idle yet.
        """
        return not self._queue and not self._inflight and all(t is None for t in self._busy_since)

    def state(self) -> str:
        """For readiness probes: ready, draining, stuck, failed or not ready."""
        if self._draining:
            return "draining"
        if self.failed:
            return "failed"
        if not self.running:
            return "not ready"
        return "stuck" if self.stuck else "ready"

    def begin_drain(self) -> None:
        """Refuse new work from now on; what was admitted still runs.

        Safe to call from a signal handler: it only sets two attributes.
        """
        if not self._draining:
            self._drain_began = time.monotonic()
            self._draining = True

    def stop(self, timeout: float = 20.0) -> bool:
        """Drain admitted inputs, then stop. True if all finished.

        `timeout` counts from `begin_drain()` when a drain already began (a signal
        handler starts it), else from now.
        """
        self.begin_drain()
        deadline = self._drain_began + timeout
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

    @property
    def full(self) -> bool:
        """No room for even one more input: what `submit` would refuse right now."""
        return len(self._queue) + self._inflight >= self.max_queue_size

    async def submit(
        self,
        texts: Sequence[str],
        rule: ExitRule = CALIBRATED,
        timeout_s: float | None = None,
        budget_s: float | None = None,
    ) -> list[Answer]:
        """Answer every text, in order.

        `budget_s`: the latency the client asked for, against which the load controller
        admits the request (None: the controller's target). Raises Overloaded, Draining
        or NotRunning at once; DeadlineExceeded when `timeout_s` passes before every
        input got into a batch; InferenceFailed when the batch holding an input failed.
        """
        rule.check(self.runtime.num_layers)
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if self._draining:
            raise Draining("server is draining")
        if not self.running:
            raise NotRunning("engine is not running")
        if not texts:
            return []
        loop = asyncio.get_running_loop()
        deadline = float("inf") if timeout_s is None else time.perf_counter() + timeout_s
        items = [_Pending(t, rule, loop, deadline) for t in texts]
        with self._cond:
            load = len(self._queue) + self._inflight
            if load + len(items) > self.max_queue_size:
                raise Overloaded(f"queue full ({self.max_queue_size} inputs)")
            if self.controller is not None:
                self.controller.update(load, time.monotonic())
                late_s = self.controller.refusal(load, len(items), budget_s)
                if late_s is not None:
                    raise TooLate("expected wait exceeds the request's budget", late_s)
            now = items[0].admitted
            self._arrival_load = 0.8 * self._arrival_load + 0.2 * load
            if self._last_arrival:
                self._arrival_gap = next_arrival_gap(
                    self._arrival_gap, now - self._last_arrival, self.max_queue_delay_s
                )
            self._last_arrival = now
            self._queue.extend(items)
            self._cond.notify()
        self._report_load()
        try:
            return await self._collect(items)
        except BaseException:
            self._abandon(items)  # the client left, a sibling failed or time ran out
            raise

    async def _collect(self, items: list[_Pending]) -> list[Answer]:
        futures = [p.future for p in items]
        deadline = items[0].deadline
        timeout = None if deadline == float("inf") else max(0.0, deadline - time.perf_counter())
        _, pending = await asyncio.wait(futures, timeout=timeout, return_when=FIRST_EXCEPTION)
        _raise_first_error(futures)
        if pending:
            if self._withdraw(items):
                raise DeadlineExceeded("deadline passed while queued")
            # Every input left is in a batch and allowed to finish, unless that batch is stuck.
            await asyncio.wait(pending, timeout=self.stuck_after_s, return_when=FIRST_EXCEPTION)
            _raise_first_error(futures)
            if not all(f.done() for f in futures):
                raise DeadlineExceeded("deadline passed while the batch was stuck")
        return [f.result() for f in futures]

    def _withdraw(self, items: list[_Pending]) -> int:
        """Take the inputs that no batch holds yet out of the queue; how many there were."""
        with self._cond:
            waiting = {id(p) for p in items if not p.taken}
            if waiting:
                self._queue = deque(p for p in self._queue if id(p) not in waiting)
                self._cond.notify_all()  # stop() waits for the queue to empty
        if waiting:
            self._report_load()
        return len(waiting)

    def _abandon(self, items: list[_Pending]) -> None:
        """Nobody will read these answers: drop what has not started, and cancel the
        futures so that late answers and errors are discarded, not logged as unread."""
        self._withdraw(items)
        for p in items:
            p.future.cancel()

    # -- worker ------------------------------------------------------------------------
    def _report_load(self) -> None:
        if self.observer is not None:
            self.observer.load(len(self._queue), self._inflight)

    def _take_batch(self) -> list[_Pending] | None:
        """The next batch (never empty), or None once the engine stops."""
        with self._cond:
            while True:
                while not self._queue and not self._stopping:
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

    def late_by(self, inputs: int = 1) -> float | None:
        """Seconds past the latency target that `inputs` more inputs would be answered,
        even at the controller's floor; None when in time (or with no controller). Read
        without the lock: a hint for shedding before a request's body is parsed."""
        c = self.controller
        return None if c is None else c.refusal(len(self._queue) + self._inflight, inputs, None)

    def adaptation(self) -> dict[str, float] | None:
        """The controller's state for the metrics; None without a controller."""
        c = self.controller
        return None if c is None else c.state(len(self._queue) + self._inflight)

    def _take_ready(self, limit: int) -> list[_Pending]:
        """What is queued now, without waiting (the batcher has work in hand)."""
        with self._cond:
            return self._pop(limit)

    def _pop(self, limit: int) -> list[_Pending]:
        """Move up to `limit` queued inputs in flight; the caller holds the lock.

        Inputs whose deadline has passed are dropped here, so they never reach the network.
        """
        now = time.perf_counter()
        batch: list[_Pending] = []
        expired = False
        while self._queue and len(batch) < limit:
            p = self._queue.popleft()
            if p.deadline < now:
                expired = True
                p.loop.call_soon_threadsafe(
                    _settle, p.future, None, DeadlineExceeded("deadline passed while queued")
                )
            else:
                p.taken = True
                batch.append(p)
        self._inflight += len(batch)
        if expired:
            self._cond.notify_all()  # stop() waits for the queue to empty
        return batch

    def _point(self) -> tuple[int, Sequence[float]]:
        """The operating point a batch starting now runs at, and its thresholds."""
        c = self.controller
        if c is None:
            return 0, self.runtime.thresholds
        with self._cond:
            k = c.point
        return k, c.ladder.points[k].thresholds

    def _rows(self, batch: list[_Pending]) -> list[Row]:
        rt = self.runtime
        L = rt.num_layers
        point, point_thresholds = self._point()
        now = time.perf_counter()
        rows = []
        for p, tokens in zip(batch, rt.tokenize([p.text for p in batch]), strict=True):
            p.started = now
            # A request's own rule is kept whatever the load (no operating point).
            p.point = point if p.rule.default else None
            th = p.rule.thresholds(rt.thresholds, point_thresholds)
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
            operating_point=p.point,
        )
        # Counted before the caller can hold the answer, so /metrics never lags it.
        if self.observer is not None:
            self.observer.answered(pred.exit_layer, L, answer.queue_s, answer.inference_s)
        p.loop.call_soon_threadsafe(_settle, p.future, answer, None)

    def _finish(self, n: int) -> None:
        with self._cond:
            self._inflight -= n
            if not self._inflight:
                # Only stop() waits for flight to end; waking the other workers (who wait
                # on the same condition for work) at every answer would only cost them.
                self._cond.notify_all()

    @staticmethod
    def _reject(p: _Pending) -> None:
        p.loop.call_soon_threadsafe(_settle, p.future, None, InferenceFailed("inference failed"))

    def _fail(self, p: _Pending, error: Exception) -> None:
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
        batcher: ContinuousBatcher[_Pending] = ContinuousBatcher(
            self.runtime.backend, self.max_batch_size
        )

        def answered(p: _Pending, pred: Prediction) -> None:
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
                batch = taken
            began = self._busy_since[i] = time.monotonic()
            if batch:
                try:
                    batcher.add(self._rows(batch), batch)
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

    def _run(self, i: int) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
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

    def _alone(self, i: int) -> bool:
        """Whether worker i, which has just taken a batch, may give a row alone the idle
        workers' threads too (`borrows_idle_threads`)."""
        others_busy = any(t is not None for j, t in enumerate(self._busy_since) if j != i)
        return borrows_idle_threads(self._arrival_load, len(self._queue), others_busy)

    def _run_batch(self, batch: list[_Pending], answered: list[int], wide: bool = False) -> int:
        """Run one batch to its last answer; how many row-layers it ran. `wide`: a row
        alone may use the threads of idle workers."""

        def on_answer(i: int, pred: Prediction) -> None:
            self._answer(batch[i], pred)
            # Out of flight at once: an input that left at layer 1 frees its place in
            # the queue's bound while the rest of its batch still runs.
            self._finish(1)
            answered[0] += 1

        rows = self._rows(batch)
        result = run_batch(self.runtime.backend, rows, on_answer, wide)
        if self.observer is not None:
            self.observer.layer_steps(result.rows_per_layer)
        return sum(result.rows_per_layer)
