"""Fair shares of the cores between the models of one server.

Policy: at most `slots` layer steps (one layer over a batch, or a row alone through the
network) run at once, across every model's workers; `slots` is the server's thread
budget, so the models together never run more threads than it. When more steps wait
than slots are free, the next free slot goes to the waiting model that has used the
least of its weighted share lately: its busy seconds, divided by its weight
(`EXITSERVE_MODEL_WEIGHTS`, default 1), decaying with a half-life of `half_life_s`.
A model under a flood thus keeps every core while the others idle, and yields to a
request of another model within one layer step, not one batch: the granularity is a
step because that is where the engine already stops between layers.

`Shared` wraps a model's backend so that each of its steps takes a turn; the engine
drives it like any backend. One model alone is never wrapped (no cost, no change).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from app.network.backends import Backend, RunningBatch


@dataclass
class _Waiter:
    model: str
    arrived: int  # ties in usage go first come, first served
    granted: threading.Event = field(default_factory=threading.Event)


class CoreShares:
    def __init__(
        self, slots: int, weights: Mapping[str, float] | None = None, half_life_s: float = 2.0
    ) -> None:
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        if half_life_s <= 0:
            raise ValueError(f"half_life_s must be > 0, got {half_life_s}")
        self.slots = slots
        self.weights = dict(weights or {})
        self.half_life_s = half_life_s
        self._lock = threading.Lock()
        self._free = slots
        self._waiting: list[_Waiter] = []
        self._arrivals = 0
        self._usage: dict[str, tuple[float, float]] = {}  # model -> (weighted s, as of when)

    def weight(self, model: str) -> float:
        return self.weights.get(model, 1.0)

    def usage(self, model: str, now: float | None = None) -> float:
        """Weighted busy seconds of `model`, decayed to `now`."""
        value, since = self._usage.get(model, (0.0, 0.0))
        now = time.monotonic() if now is None else now
        return value * math.pow(0.5, max(0.0, now - since) / self.half_life_s)

    @property
    def running(self) -> int:
        """Steps running now."""
        return self.slots - self._free

    @contextmanager
    def turn(self, model: str) -> Iterator[None]:
        """Hold one slot for `model` while the block runs; its time is charged to it."""
        self._acquire(model)
        began = time.monotonic()
        try:
            yield
        finally:
            self._release(model, time.monotonic() - began)

    def _acquire(self, model: str) -> None:
        with self._lock:
            if self._free > 0 and not self._waiting:
                self._free -= 1
                return
            waiter = _Waiter(model, self._arrivals)
            self._arrivals += 1
            self._waiting.append(waiter)
        waiter.granted.wait()  # the releaser hands its slot over: `_free` stays as it is

    def _release(self, model: str, busy_s: float) -> None:
        with self._lock:
            now = time.monotonic()
            self._usage[model] = (self.usage(model, now) + busy_s / self.weight(model), now)
            if not self._waiting:
                self._free += 1
                return
            nxt = min(self._waiting, key=lambda w: (self.usage(w.model, now), w.arrived))
            self._waiting.remove(nxt)
        nxt.granted.set()


class Shared(Backend):
    """A model's backend whose every step takes a turn of the cores (`CoreShares`)."""

    def __init__(self, inner: Backend, shares: CoreShares, model: str) -> None:
        super().__init__(inner.model)
        self.inner, self.shares, self.model_name = inner, shares, model
        self.name = inner.name

    def begin(self, token_ids: Sequence[Sequence[int]]) -> RunningBatch:
        with self.shares.turn(self.model_name):
            return self.inner.begin(token_ids)

    def step(self, i: int, batch: RunningBatch, exit: bool = False) -> RunningBatch:
        with self.shares.turn(self.model_name):
            return self.inner.step(i, batch, exit)

    def keep(self, batch: RunningBatch, rows: Sequence[int]) -> RunningBatch:
        return self.inner.keep(batch, rows)

    def join(self, a: RunningBatch, b: RunningBatch) -> RunningBatch:
        return self.inner.join(a, b)

    def run_alone(
        self,
        token_ids: Sequence[int],
        thresholds: Sequence[float],
        max_layers: int,
        wide: bool = False,
    ) -> torch.Tensor | None:
        with self.shares.turn(self.model_name):
            # More threads only while no other step runs: they are the other slots'.
            wide = wide and self.shares.running == 1
            return self.inner.run_alone(token_ids, thresholds, max_layers, wide)
