"""Fair shares of the cores between models (`app.engine.shares`)."""

from __future__ import annotations

import threading
import time

import pytest

from app.engine.executor import Row, run_batch
from app.engine.shares import CoreShares, Shared
from app.network import artifact
from app.network.backends import make_backend
from tests.tiny import random_texts


def hold(
    shares: CoreShares, model: str, order: list[str], gate: threading.Event
) -> threading.Thread:
    """A thread that takes a turn for `model`, notes it, and keeps it until `gate`."""

    def run() -> None:
        with shares.turn(model):
            order.append(model)
            gate.wait(10)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def waiting(shares: CoreShares, n: int) -> None:
    deadline = time.monotonic() + 10
    while len(shares._waiting) < n:
        assert time.monotonic() < deadline
        time.sleep(0.001)


def busy(shares: CoreShares, model: str, seconds: float) -> None:
    with shares.turn(model):
        time.sleep(seconds)


@pytest.mark.parametrize(("weights", "first"), [({}, "B"), ({"A": 100.0}, "A")])
def test_the_next_slot_goes_to_the_model_that_used_least_of_its_share(
    weights: dict[str, float], first: str
) -> None:
    shares = CoreShares(1, weights)
    busy(shares, "A", 0.02)
    busy(shares, "B", 0.01)  # B used half A's time: with equal weights it goes first
    order: list[str] = []
    gate = threading.Event()
    threads = [hold(shares, "A", order, gate)]
    while not order:
        time.sleep(0.001)
    threads.append(hold(shares, "A", order, gate))  # arrives first ...
    waiting(shares, 1)
    threads.append(hold(shares, "B", order, gate))  # ... but B has used less
    waiting(shares, 2)
    assert shares.running == 1
    gate.set()
    for t in threads:
        t.join(10)
    assert order == ["A", first, "B" if first == "A" else "A"]
    assert shares.running == 0


def test_a_model_alone_takes_every_slot_without_waiting() -> None:
    shares = CoreShares(2)
    order: list[str] = []
    gate = threading.Event()
    threads = [hold(shares, "A", order, gate) for _ in range(2)]
    deadline = time.monotonic() + 10
    while len(order) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert shares.running == 2 and not shares._waiting
    gate.set()
    for t in threads:
        t.join(10)


def test_usage_decays_with_the_half_life() -> None:
    shares = CoreShares(1, {"A": 2.0}, half_life_s=1.0)
    shares._usage["A"] = (4.0, 100.0)
    assert shares.usage("A", 101.0) == pytest.approx(2.0)
    assert shares.usage("A", 103.0) == pytest.approx(0.5)
    assert shares.usage("B", 103.0) == 0.0


def test_a_flood_of_one_model_leaves_the_other_its_share() -> None:
    """Two workers of A and one of B loop over 2 ms steps on one slot: first come, first
    served would give B a third of the time; its equal share is half."""
    shares = CoreShares(1)
    spent = {"A": 0.0, "B": 0.0}
    stop = time.monotonic() + 0.6

    def loop(model: str) -> None:
        while time.monotonic() < stop:
            with shares.turn(model):
                t0 = time.monotonic()
                time.sleep(0.002)
                spent[model] += time.monotonic() - t0

    threads = [threading.Thread(target=loop, args=(m,)) for m in ("A", "A", "B")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert spent["B"] / (spent["A"] + spent["B"]) > 0.42


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        CoreShares(0)
    with pytest.raises(ValueError):
        CoreShares(1, half_life_s=0)


def test_a_shared_backend_answers_as_its_own(tiny_model_dir: object) -> None:
    loaded = artifact.load(tiny_model_dir)  # type: ignore[arg-type]
    inner = make_backend(loaded.network, "cpu", "int8")
    shared = Shared(inner, CoreShares(1), "tiny")
    assert shared.name == inner.name and shared.num_layers == inner.num_layers
    ids = loaded.tokenizer.encode(random_texts(9, seed=4))
    L = inner.num_layers
    for rows in ([Row(ids[0], [0.8] * L, L)], [Row(r, [0.8] * L, L) for r in ids]):
        assert run_batch(shared, rows).predictions == run_batch(inner, rows).predictions
