"""The engine: admission and lifecycle; its worker loops are in `workers`, the
batching policy in `policy`, the errors in `errors`.

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
begins, and a request whose expected latency, even at the controller's shallowest point,
exceeds its budget is refused at once (Overloaded, with a retry delay). The worker
reports every batch's busy time and work to the controller, and wakes it while it is
below point 0 so that it climbs back even when no traffic comes.

Audit (app.engine.audit): after an answer at the model's own exits is given, a sample
of them is queued to run again through every exit; a worker runs them when nothing is
queued, or a few between batches when they pile up.

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
from collections.abc import Sequence

from app.engine.adapt import LoadController
from app.engine.audit import Audit
from app.engine.errors import (
    DeadlineExceeded,
    Draining,
    NotRunning,
    Overloaded,
    TooLate,
)
from app.engine.policy import next_arrival_gap
from app.engine.requests import Answer, EngineObserver, Pending, raise_first_error, settle
from app.engine.runtime import ModelRuntime
from app.engine.workers import WorkerLoops
from app.network.exit_rule import ExitRule
from app.network.tokenizer import TRUNCATE, Truncation

log = logging.getLogger(__name__)

CALIBRATED = ExitRule()  # the model's own exits, left to the load controller
AUDIT_QUEUE = 256  # audits waiting for a worker; past it the oldest are dropped


class Engine(WorkerLoops):
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
        audit: Audit | None = None,
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
        self._queue: deque[Pending] = deque()
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
        self.audit = audit  # app.engine.audit: answers run again through every exit
        self._audits: deque[tuple[list[int], int]] = deque(maxlen=AUDIT_QUEUE)

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
            p.loop.call_soon_threadsafe(settle, p.future, None, Draining("server shutting down"))
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
        truncation: Truncation = TRUNCATE,
    ) -> list[Answer]:
        """Answer every text, in order.

        `budget_s`: the latency the client asked for, against which the load controller
        admits the request (None: the controller's target). Raises Overloaded, Draining
        or NotRunning at once; DeadlineExceeded when `timeout_s` passes before every
        input got into a batch; InferenceFailed when the batch holding an input failed;
        InputTooLong for an input over the limit when `truncation` forbids cutting it.
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
        items = [Pending(t, rule, loop, deadline, truncation) for t in texts]
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

    async def _collect(self, items: list[Pending]) -> list[Answer]:
        futures = [p.future for p in items]
        deadline = items[0].deadline
        timeout = None if deadline == float("inf") else max(0.0, deadline - time.perf_counter())
        _, pending = await asyncio.wait(futures, timeout=timeout, return_when=FIRST_EXCEPTION)
        raise_first_error(futures)
        if pending:
            if self._withdraw(items):
                raise DeadlineExceeded("deadline passed while queued")
            # Every input left is in a batch and allowed to finish, unless that batch is stuck.
            await asyncio.wait(pending, timeout=self.stuck_after_s, return_when=FIRST_EXCEPTION)
            raise_first_error(futures)
            if not all(f.done() for f in futures):
                raise DeadlineExceeded("deadline passed while the batch was stuck")
        return [f.result() for f in futures]

    def _withdraw(self, items: list[Pending]) -> int:
        """Take the inputs that no batch holds yet out of the queue; how many there were."""
        with self._cond:
            waiting = {id(p) for p in items if not p.taken}
            if waiting:
                self._queue = deque(p for p in self._queue if id(p) not in waiting)
                self._cond.notify_all()  # stop() waits for the queue to empty
        if waiting:
            self._report_load()
        return len(waiting)

    def _abandon(self, items: list[Pending]) -> None:
        """Nobody will read these answers: drop what has not started, and cancel the
        futures so that late answers and errors are discarded, not logged as unread."""
        self._withdraw(items)
        for p in items:
            p.future.cancel()

    # -- the load controller ---------------------------------------------------------
    def late_by(self, inputs: int = 1) -> float | None:
        """Seconds past the latency target that `inputs` more inputs would be answered,
        even at the controller's shallowest point; None when in time (or with no controller). Read
        without the lock: a hint for shedding before a request's body is parsed."""
        c = self.controller
        return None if c is None else c.refusal(len(self._queue) + self._inflight, inputs, None)

    def adaptation(self) -> dict[str, float] | None:
        """The controller's state for the metrics; None without a controller."""
        c = self.controller
        return None if c is None else c.state(len(self._queue) + self._inflight)
