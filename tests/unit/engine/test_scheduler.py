"""The engine under deadlines and faults: what is dropped, what fails, what keeps serving.

A runtime whose `tokenize` waits on an Event holds the worker inside a batch (the worker
tokenizes each batch first), so the queue's state is known exactly. No test asserts a
wall-clock time: waits on events and polls carry generous timeouts as failure guards.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch

from app.engine.adapt import Ladder, LoadController, OperatingPoint
from app.engine.errors import DeadlineExceeded, Draining, InferenceFailed, NotRunning, TooLate
from app.engine.policy import borrows_idle_threads
from app.engine.requests import Answer
from app.engine.runtime import ModelRuntime, load_runtime
from app.engine.scheduler import Engine
from app.network.backends import RunningBatch
from app.network.exit_rule import ExitRule

T = TypeVar("T")
GUARD_S = 10.0  # only ever reached when a test fails


@pytest.fixture
def runtime(tiny_model_dir: Path) -> ModelRuntime:
    return load_runtime(tiny_model_dir, "cpu", "none", 1)


class Held:
    """Holds the worker inside its next batch (in `tokenize`) until `release()`; records
    every text the worker tokenized, which is every text that reached compute."""

    def __init__(self, runtime: ModelRuntime, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entered, self.gate = threading.Event(), threading.Event()
        self.seen: list[str] = []
        tokenize = runtime.tokenize

        def held(texts: list[str]) -> list[list[int]]:
            self.seen.extend(texts)
            self.entered.set()
            assert self.gate.wait(GUARD_S), "the test never released the worker"
            return tokenize(texts)

        monkeypatch.setattr(runtime, "tokenize", held)

    def release(self) -> None:
        self.gate.set()


@pytest.fixture
def engine_of(runtime: ModelRuntime) -> Iterator[Callable[..., Engine]]:
    engines: list[Engine] = []

    def make(**kwargs: Any) -> Engine:
        e = Engine(runtime, max_queue_delay_s=0.0, **kwargs)
        e.start()
        engines.append(e)
        return e

    yield make
    for e in engines:
        e.stop(timeout=GUARD_S)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, GUARD_S * 2))


async def until(condition: Callable[[], bool]) -> None:
    """Yield to the loop until `condition` holds (guarded)."""
    stop = time.monotonic() + GUARD_S
    while not condition():
        assert time.monotonic() < stop, "condition never held"
        await asyncio.sleep(0.005)


async def in_thread(event: threading.Event) -> None:
    assert await asyncio.to_thread(event.wait, GUARD_S)


def test_the_caller_stops_waiting_at_its_deadline_and_the_input_never_runs(
    engine_of: Callable[..., Engine], runtime: ModelRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = engine_of()
    held = Held(runtime, monkeypatch)

    async def main() -> None:
        first = asyncio.ensure_future(engine.submit(["first"]))
        await in_thread(held.entered)  # the worker holds "first" in its batch
        with pytest.raises(DeadlineExceeded):
            await engine.submit(["late one", "late two"], timeout_s=0.05)
        assert not first.done()  # the caller did not wait for the busy worker
        assert engine.queued() == 0  # withdrawn: no batch will take them
        held.release()
        assert len(await first) == 1
        assert len(await engine.submit(["after"], timeout_s=GUARD_S)) == 1

    run(main())
    assert held.seen == ["first", "after"]


def test_the_worker_drops_inputs_whose_deadline_passed_in_the_queue(
    engine_of: Callable[..., Engine], runtime: ModelRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The event loop is blocked on purpose past the deadline, so the caller's own timer
    # cannot fire: only the worker can drop the input, and it must do so before compute.
    engine = engine_of()
    held = Held(runtime, monkeypatch)

    async def main() -> None:
        first = asyncio.ensure_future(engine.submit(["first"]))
        await in_thread(held.entered)
        late = asyncio.ensure_future(engine.submit(["late"], timeout_s=0.02))
        await until(lambda: engine.queued() == 1)  # "late" is admitted
        time.sleep(0.05)  # the loop is blocked; "late" expires in the queue
        held.release()
        stop = time.monotonic() + GUARD_S
        while not engine.idle:  # still blocking the loop: the worker finishes alone
            assert time.monotonic() < stop
            time.sleep(0.001)
        with pytest.raises(DeadlineExceeded):
            await late
        assert len(await first) == 1

    run(main())
    assert held.seen == ["first"]


def test_an_input_already_in_a_batch_finishes_after_its_deadline(
    engine_of: Callable[..., Engine], runtime: ModelRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = engine_of()
    held = Held(runtime, monkeypatch)

    async def main() -> None:
        # The worker must take the input before its deadline: a deadline of a few ms
        # could pass first on a busy machine (the input is then dropped, never held).
        task = asyncio.ensure_future(engine.submit(["slow but started"], timeout_s=1.0))
        await in_thread(held.entered)
        await asyncio.sleep(1.0)  # its deadline passes while its batch runs
        assert not task.done()  # the caller still waits for its input in the batch
        held.release()
        answers = await task
        assert answers[0].label in runtime.labels

    run(main())


def poison(runtime: ModelRuntime, monkeypatch: pytest.MonkeyPatch, word: str) -> None:
    """The network raises (with a path in the message) for batches holding `word`."""
    [poison_id] = [i for i in runtime.tokenizer.encode([word])[0] if i > 3]  # not [CLS] etc.
    begin = runtime.backend.begin

    def failing(token_ids: Sequence[Sequence[int]]) -> RunningBatch:
        if any(poison_id in row for row in token_ids):
            raise RuntimeError("/opt/secret/weights.bin: kernel exploded")
        return begin(token_ids)

    run_alone = runtime.backend.run_alone

    def failing_alone(token_ids: Sequence[int], *rule: object) -> torch.Tensor | None:
        if poison_id in token_ids:  # a row alone may run in one call, without `begin`
            raise RuntimeError("/opt/secret/weights.bin: kernel exploded")
        return run_alone(token_ids, *rule)

    monkeypatch.setattr(runtime.backend, "begin", failing)
    monkeypatch.setattr(runtime.backend, "run_alone", failing_alone)


def test_a_failing_batch_fails_only_its_own_requests(
    engine_of: Callable[..., Engine], runtime: ModelRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = engine_of(max_batch_size=1)  # each input is its own batch
    poison(runtime, monkeypatch, "rotten")

    async def main() -> None:
        results = await asyncio.gather(
            engine.submit(["good film"]),
            engine.submit(["rotten"]),
            engine.submit(["fine acting"]),
            return_exceptions=True,
        )
        assert isinstance(results[1], InferenceFailed)
        assert "secret" not in str(results[1])  # the engine's error carries no internals
        assert all(isinstance(r, list) and len(r) == 1 for r in (results[0], results[2]))
        assert len(await engine.submit(["still serving"])) == 1

    run(main())
    assert engine.ready


def test_a_batch_running_too_long_makes_the_engine_stuck_until_it_ends(
    engine_of: Callable[..., Engine], runtime: ModelRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = engine_of(stuck_after_s=0.05)
    held = Held(runtime, monkeypatch)

    async def main() -> None:
        assert engine.ready
        task = asyncio.ensure_future(engine.submit(["held"]))
        await in_thread(held.entered)
        await until(lambda: engine.stuck)
        assert not engine.ready and engine.state() == "stuck"
        assert not engine.failed  # stuck is not dead: liveness holds
        held.release()
        assert len(await task) == 1
        await until(lambda: not engine.stuck)
        assert engine.ready and engine.state() == "ready"

    run(main())


def test_a_dead_worker_fails_what_waits_and_the_engine(
    engine_of: Callable[..., Engine], runtime: ModelRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = engine_of()
    held = Held(runtime, monkeypatch)

    def broken() -> None:
        raise RuntimeError("a bug outside any batch")

    async def main() -> None:
        first = asyncio.ensure_future(engine.submit(["first"]))
        await in_thread(held.entered)
        second = asyncio.ensure_future(engine.submit(["second"]))
        await until(lambda: engine.queued() == 1)
        monkeypatch.setattr(engine, "_take_batch", broken)  # the worker's next call dies
        held.release()
        assert len(await first) == 1
        with pytest.raises(InferenceFailed):
            await second  # nobody is left to run it: failed, not left hanging
        assert engine.failed and not engine.ready and engine.state() == "failed"
        with pytest.raises(NotRunning):
            await engine.submit(["third"])

    run(main())


def test_drain_refuses_new_work_and_reports_idle(
    engine_of: Callable[..., Engine], runtime: ModelRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = engine_of()
    held = Held(runtime, monkeypatch)

    async def main() -> None:
        task = asyncio.ensure_future(engine.submit(["admitted"]))
        await in_thread(held.entered)
        engine.begin_drain()
        assert engine.state() == "draining" and not engine.idle
        held.release()
        assert len(await task) == 1  # admitted before the drain: answered
        await until(lambda: engine.idle)

    run(main())


def test_stop_waits_for_the_queued_backlog_and_answers_all_of_it(
    engine_of: Callable[..., Engine], runtime: ModelRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What plain `uvicorn app.main:app` relies on: the lifespan's stop() drains.
    engine = engine_of(max_batch_size=1)
    held = Held(runtime, monkeypatch)
    backlog = [f"queued {i}" for i in range(5)]

    async def main() -> bool:
        first = asyncio.ensure_future(engine.submit(["first"]))
        await in_thread(held.entered)
        rest = [asyncio.ensure_future(engine.submit([t])) for t in backlog]
        await until(lambda: engine.queued() == len(backlog))
        engine.begin_drain()
        stopping = asyncio.ensure_future(asyncio.to_thread(engine.stop, GUARD_S))
        await asyncio.sleep(0.1)
        assert not stopping.done()  # it waits while work is admitted
        held.release()
        answers = [await first, *[await r for r in rest]]
        assert [len(a) for a in answers] == [1] * (1 + len(backlog))
        return await stopping

    assert run(main()) is True
    assert held.seen == ["first", *backlog]  # every queued input reached the network


def test_stop_refuses_only_the_work_still_queued_at_its_timeout(
    engine_of: Callable[..., Engine], runtime: ModelRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = engine_of(max_batch_size=1)
    held = Held(runtime, monkeypatch)

    async def main() -> bool:
        first = asyncio.ensure_future(engine.submit(["first"]))
        await in_thread(held.entered)
        rest = [asyncio.ensure_future(engine.submit([f"queued {i}"])) for i in range(3)]
        await until(lambda: engine.queued() == 3)
        drained = await asyncio.to_thread(engine.stop, 0.2)  # the worker is still held
        for r in rest:
            with pytest.raises(Draining):
                await r
        held.release()
        assert len(await first) == 1  # in a batch at the timeout: it finishes
        return drained

    assert run(main()) is False
    assert held.seen == ["first"]


@pytest.mark.parametrize("timeout_s", [0.0, -1.0])
def test_a_deadline_must_lie_ahead(engine_of: Callable[..., Engine], timeout_s: float) -> None:
    engine = engine_of()
    with pytest.raises(ValueError, match="timeout_s"):
        run(engine.submit(["a"], timeout_s=timeout_s))


def test_an_early_answer_frees_its_place_while_its_batch_runs_on(
    engine_of: Callable[..., Engine], runtime: ModelRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Room for three inputs. "easy" (threshold 0.0) and "hard" (threshold 1.0) share a
    # batch, held before its second layer: "easy" has left at layer 1, so its place is
    # free for new work while "hard" is still in flight.
    engine = engine_of(max_queue_size=3, max_batch_size=8)
    held = Held(runtime, monkeypatch)
    entered_2, gate_2 = threading.Event(), threading.Event()
    step = runtime.backend.step

    def layer_held_at_2(i: int, batch: RunningBatch, exit: bool = False) -> RunningBatch:
        if i == 1 and "hard" in held.seen:  # the second batch only
            entered_2.set()
            assert gate_2.wait(GUARD_S), "the test never released the second layer"
        return step(i, batch, exit)

    monkeypatch.setattr(runtime.backend, "step", layer_held_at_2)

    async def main() -> None:
        first = asyncio.ensure_future(engine.submit(["first"]))
        await in_thread(held.entered)  # the worker holds "first"; the next batch queues
        easy = asyncio.ensure_future(engine.submit(["easy"], ExitRule(threshold=0.0)))
        hard = asyncio.ensure_future(engine.submit(["hard"], ExitRule(threshold=1.0)))
        await until(lambda: engine.queued() == 2)
        held.release()
        assert len(await first) == 1
        await in_thread(entered_2)
        assert held.seen == ["first", "easy", "hard"]  # one batch: easy and hard
        assert (await easy)[0].exit_layer == 1
        assert not hard.done()
        # Only "hard" is in flight: two more inputs fit (one, if "easy" still counted).
        later = asyncio.ensure_future(engine.submit(["late", "later"], ExitRule(threshold=0.0)))
        await until(lambda: engine.queued() == 2)  # admitted, not refused
        assert engine.full
        gate_2.set()
        assert (await hard)[0].exit_layer == runtime.num_layers
        assert [a.exit_layer for a in await later] == [1, 1]

    run(main())


# -- the timings the load controller stands on ----------------------------------------
HOLD_S = 0.3  # how long the test holds the worker inside a batch


def test_holding_the_worker_grows_the_running_inputs_inference_and_the_queued_ones_wait(
    engine_of: Callable[..., Engine], runtime: ModelRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Lower bounds only: the hold is a sleep the test controls, so it is a floor on the
    # time that grew, however slow the machine; which timing grew is the point.
    engine = engine_of()
    held = Held(runtime, monkeypatch)

    async def main() -> tuple[Answer, Answer]:
        running = asyncio.ensure_future(engine.submit(["running"]))
        await in_thread(held.entered)  # its batch began: its inference time runs
        queued = asyncio.ensure_future(engine.submit(["queued"]))
        await until(lambda: engine.queued() == 1)
        await asyncio.sleep(HOLD_S)
        held.release()
        return (await running)[0], (await queued)[0]

    running, queued = run(main())
    assert running.inference_s >= HOLD_S > running.queue_s
    assert queued.queue_s >= HOLD_S > queued.inference_s


# -- the load controller in the engine -------------------------------------------------
def two_point_ladder(runtime: ModelRuntime) -> Ladder:
    """Point 0: full depth; point 1: every input leaves at the first exit."""
    L = runtime.num_layers
    return Ladder(
        (
            OperatingPoint((1.0,) * (L - 1) + (0.0,), 0.9, float(L)),
            OperatingPoint((0.0,) * L, 0.8, 1.0),
        ),
        fixed_cost=0.0,
    )


def test_under_load_queued_inputs_take_the_lower_point_and_own_rules_keep_theirs(
    engine_of: Callable[..., Engine], runtime: ModelRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    L = runtime.num_layers
    c = LoadController(  # no smoothing: the test's arrivals come within microseconds
        two_point_ladder(runtime), target_s=1.0, max_drop=0.5, hold_s=0.05, smooth_s=1e-9
    )
    c.observe(1.0, 0.1)  # measured: 0.1 s per layer unit, so 8 queued inputs at full
    engine = engine_of(controller=c)  # depth are 4.8 s of work: far past the target
    held = Held(runtime, monkeypatch)

    async def main() -> None:
        first = asyncio.ensure_future(engine.submit(["first"]))
        await in_thread(held.entered)  # the worker holds "first" (at point 0)
        waiting = [asyncio.ensure_future(engine.submit([f"queued {i}"])) for i in range(6)]
        own = asyncio.ensure_future(engine.submit(["own"], ExitRule(threshold=1.0)))
        await until(lambda: engine.queued() == 7)
        assert c.point == 1  # the arrivals moved it down
        held.release()
        [a] = await first
        assert (a.operating_point, a.exit_layer) == (0, L)
        for w in waiting:
            [a] = await w
            assert (a.operating_point, a.exit_layer) == (1, 1)
        [a] = await own
        assert (a.operating_point, a.exit_layer) == (None, L)
        # The queue is gone: the controller climbs back on its own, with no traffic.
        await until(lambda: c.point == 0)
        [a] = await engine.submit(["later"])
        assert (a.operating_point, a.exit_layer) == (0, L)

    run(main())
    assert c.degraded_s > 0


def test_a_request_that_cannot_be_served_in_its_budget_is_refused_at_once(
    engine_of: Callable[..., Engine], runtime: ModelRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Batches of one input: a refusal needs a full batch ahead.
    c = LoadController(  # admitting up to 80% of the budget: the figures below
        two_point_ladder(runtime), target_s=1.0, max_drop=0.5, batch_size=1, admit_at=0.8
    )
    c.observe(1.0, 0.1)  # 0.1 s per input even at the floor (1 layer unit)
    engine = engine_of(controller=c, max_batch_size=1)
    held = Held(runtime, monkeypatch)

    async def main() -> None:
        first = asyncio.ensure_future(engine.submit(["first"]))
        await in_thread(held.entered)
        # 1 in flight + 7 new: 0.8 s at the floor, within 80% of the target.
        fits = asyncio.ensure_future(engine.submit([f"t{i}" for i in range(7)]))
        await until(lambda: engine.queued() == 7)
        # 8 + 5: 1.3 s, half a second past 0.8 s: refused, retry after 0.5 s.
        with pytest.raises(TooLate) as refused:
            await engine.submit([f"u{i}" for i in range(5)])
        assert refused.value.retry_after_s == pytest.approx(0.5)
        # Its own, longer budget admits it.
        late_ok = asyncio.ensure_future(engine.submit(["v"], budget_s=2.0))
        await until(lambda: engine.queued() == 8)
        held.release()
        assert len(await first) == 1 and len(await fits) == 7 and len(await late_ok) == 1

    run(main())
    assert "u0" not in held.seen


@pytest.mark.parametrize(
    ("arrival_load", "queued", "others_busy", "borrows"),
    [
        (0.0, 0, False, True),  # a lone client: the other workers idle
        (0.0, 0, True, False),  # another worker is at work
        (0.0, 1, False, False),  # more work is waiting
        (0.6, 0, False, False),  # arrivals have been finding other inputs admitted
        (0.49, 0, False, True),
    ],
)
def test_a_row_alone_borrows_idle_threads_only_when_nothing_else_runs(
    arrival_load: float, queued: int, others_busy: bool, borrows: bool
) -> None:
    assert borrows_idle_threads(arrival_load, queued, others_busy) is borrows


def test_a_lone_request_runs_on_the_idle_workers_threads_and_a_crowd_does_not(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the engine's surface: what the network is asked to run, per request."""
    runtime = load_runtime(tiny_model_dir, "cpu", "int8", 1, "auto", 2)  # wide: 2 threads
    widths: list[bool] = []
    run_alone = runtime.backend.run_alone

    def spied(ids: Any, thresholds: Any, max_layers: int, wide: bool = False) -> Any:
        widths.append(wide)
        return run_alone(ids, thresholds, max_layers, wide)

    monkeypatch.setattr(runtime.backend, "run_alone", spied)
    engine = Engine(runtime, workers=2, max_queue_delay_s=0.0)
    engine.start()
    try:

        async def main() -> None:
            for _ in range(3):  # one at a time: each finds the engine empty
                await until(lambda: engine.idle)
                await engine.submit(["a lone sentence"])
            assert widths == [True] * 3
            widths.clear()
            # A crowd: arrivals find inputs admitted, so no row borrows a core.
            await asyncio.gather(*(engine.submit([f"crowd {i}"]) for i in range(64)))
            assert True not in widths

        run(main())
    finally:
        engine.stop(GUARD_S)
