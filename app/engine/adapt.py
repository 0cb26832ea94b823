"""Adapt to load: move along the model's operating ladder, admit by expected wait.

Calibration gives a ladder of operating points (`Ladder`): point 0 is the calibrated
thresholds; each point below answers more inputs at shallower exits, trading a little
calibration-split accuracy for less compute per input. The `LoadController` keeps the
service on the highest point that still serves a new input within the latency target:

  expected latency at point k = time for the workers to clear the inputs queued or in
                                flight ahead, plus the time of the batch the new input
                                rides in, both at point k's cost per input

Cost is counted in layer units: an input that leaves at exit e costs `fixed + e`, where
`fixed` is the per-input work outside the layers (embedding, tokenizing), from the layer
costs measured at calibration. A batch takes `a + b x work` seconds: `a` is what a batch
costs whatever its size (Python, small kernels: most of a batch of one), `b` the seconds
per unit of work. Both are fitted by least squares over the batches the engine really
runs, recent ones weighing most, so the estimate follows thread contention and the mix
of exits as they are now; Q inputs ahead then drain in ceil(Q / batch size) x a +
Q x cost x b seconds, over the workers, and the input's own batch of n takes a +
n x cost x b on one worker (without the per-batch term a burst looks far slower than
its batches run). Two timed batches at start-up (one input, a full batch) anchor the fit
until traffic has shown both sizes.

Moves (point 0 is the calibrated point; a higher index is shallower): to a shallower
point (the deepest whose estimate is under `shallower_at` x target, at most to
`shallowest`) as soon as the current point's estimate passes `shallower_at` x target;
one point deeper once that point has stayed under `deeper_at` x target for `hold_s`, and
again after each further `hold_s`. The gap between the two fractions and the hold are
the hysteresis. `shallowest` is the shallowest point whose calibration accuracy is
within `max_drop` of point 0's (and every point deeper too; /info calls it the floor);
a drop of 0 keeps point 0 always.

Admission: a request whose expected latency even at `shallowest` exceeds `admit_at` of its
budget (its own deadline, or the target) is refused at once, with a retry delay computed
from the wait: queuing it would only make it fail later and slow down everyone behind
it. The estimate is typical, the tail runs above it (its p99 about twice it, measured
under overload): hence a fraction well under 1.

Moves follow the load smoothed over `smooth_s` (a Poisson stream's bursts are not
overload); admission reads it as it is. The two compare different things: moves the
current point's estimate, admission the shallowest point's, which is smaller by the
ladder's cost ratio (1.4x on the default model); `shallower_at` stays under
`admit_at` times that ratio, so that the controller goes shallower before admission
caps the queue. The figures behind the fractions and the smoothing: docs/decisions.md
("Adapting to load").

No lock of its own and no clock read: the engine calls it under its queue lock and
passes the time, so tests drive it with a fake clock and synthetic rates.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

log = logging.getLogger(__name__)
STARTUP_LOG = logging.getLogger("exitserve")  # the server's start-up lines, as before


@dataclass(frozen=True)
class OperatingPoint:
    thresholds: tuple[float, ...]  # per exit, as the executor's rows take them
    accuracy: float  # on the calibration split
    mean_layers: float  # on the calibration split
    relative_cost: float = 1.0  # compute per input against full depth

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OperatingPoint:
        return cls(
            thresholds=tuple(float(t) for t in d["thresholds"]),
            accuracy=float(d["accuracy"]),
            mean_layers=float(d["mean_layers"]),
            relative_cost=float(d.get("relative_cost", 1.0)),
        )


@dataclass(frozen=True)
class Ladder:
    """Operating points, from the calibrated one (0) to the most aggressive."""

    points: tuple[OperatingPoint, ...]
    fixed_cost: float = 0.5  # per-input work outside the layers, in layer units

    def __post_init__(self) -> None:
        if not self.points:
            raise ValueError("a ladder needs at least one operating point")
        depths = [p.mean_layers for p in self.points]
        if any(b > a for a, b in pairwise(depths)):
            raise ValueError(f"mean depth must not grow down the ladder, got {depths}")
        if self.fixed_cost < 0:
            raise ValueError(f"fixed_cost must be >= 0, got {self.fixed_cost}")

    def __len__(self) -> int:
        return len(self.points)

    def cost(self, k: int) -> float:
        """Work per input at point k, in layer units."""
        return self.fixed_cost + self.points[k].mean_layers

    def shallowest(self, max_drop: float) -> int:
        """The shallowest point reachable without any point on the way losing more than
        `max_drop` of calibration accuracy against point 0."""
        if max_drop < 0:
            raise ValueError(f"max_drop must be >= 0, got {max_drop}")
        best = self.points[0].accuracy - max_drop - 1e-9
        k = 0
        while k + 1 < len(self.points) and self.points[k + 1].accuracy >= best:
            k += 1
        return k

    @classmethod
    def single(cls, thresholds: Sequence[float], accuracy: float, mean_layers: float) -> Ladder:
        """A model calibrated without a ladder: one point, nothing to move along."""
        return cls((OperatingPoint(tuple(thresholds), accuracy, mean_layers),))

    @classmethod
    def from_calibration(cls, thresholds: Sequence[float], calibration: dict[str, Any]) -> Ladder:
        """The ladder stored by `exitserve calibrate`, or a single point without one."""
        stored = calibration.get("ladder")
        if not stored:
            return cls.single(
                thresholds,
                float(calibration.get("adaptive_accuracy", 0.0)),
                float(calibration.get("mean_layers", len(thresholds))),
            )
        points = tuple(OperatingPoint.from_dict(p) for p in stored["points"])
        if list(points[0].thresholds) != [float(t) for t in thresholds]:
            raise ValueError("the ladder's point 0 is not the model's calibrated thresholds")
        return cls(points, float(stored.get("fixed_cost", 0.5)))


class CostModel:
    """Seconds per batch = a + b x work, fitted on recent batches (see the module doc)."""

    def __init__(self, memory_s: float = 2.0, prior_weight: float = 1.0) -> None:
        self.memory_s = memory_s  # busy seconds after which a batch weighs 1/e
        self.prior_weight = prior_weight  # what the start-up anchors weigh, in batches
        # Decayed sums over batches of 1, w, w^2, y and w y (w: work, y: seconds).
        self._n = self._w = self._ww = self._y = self._wy = 0.0
        self._prior = (0.0, 0.0, 0.0, 0.0, 0.0)
        self._refit()

    def anchor(self, batches: list[tuple[float, float]]) -> None:
        """(work, seconds) of batches timed at start-up: they never decay, and keep the
        fit defined when traffic has shown one batch size only."""
        k = self.prior_weight
        self._prior = (
            k * len(batches),
            k * sum(w for w, _ in batches),
            k * sum(w * w for w, _ in batches),
            k * sum(y for _, y in batches),
            k * sum(w * y for w, y in batches),
        )
        self._refit()

    def observe(self, work: float, seconds: float) -> None:
        if work <= 0 or seconds < 0:
            return
        keep = math.exp(-seconds / self.memory_s)
        self._n = keep * self._n + 1
        self._w = keep * self._w + work
        self._ww = keep * self._ww + work * work
        self._y = keep * self._y + seconds
        self._wy = keep * self._wy + work * seconds
        self._refit()

    def _refit(self) -> None:
        """(a, b), both >= 0, into `fitted`; None before any batch or anchor. Once per
        batch, not per estimate: admission asks for several estimates per request."""
        pn, pw, pww, py, pwy = self._prior
        n, w, ww, y, wy = self._n + pn, self._w + pw, self._ww + pww, self._y + py, self._wy + pwy
        self.fitted: tuple[float, float] | None = None
        if w <= 0:
            return
        det = n * ww - w * w
        if det > 1e-9 * n * ww:  # batches of more than one size: both terms
            b = (n * wy - w * y) / det
            a = (y - b * w) / n
            if a >= 0 and b > 0:
                self.fitted = (a, b)
                return
        self.fitted = (0.0, y / w)  # one size only, or a fit outside reason: all per work


class LoadController:
    """Chooses the operating point from the expected wait; decides admission."""

    def __init__(
        self,
        ladder: Ladder,
        target_s: float,
        max_drop: float,
        workers: int = 1,
        batch_size: int = 32,
        shallower_at: float = 0.45,
        admit_at: float = 0.4,
        deeper_at: float = 0.25,
        hold_s: float = 0.5,
        smooth_s: float = 0.25,
        memory_s: float = 2.0,
    ) -> None:
        if target_s < 0:
            raise ValueError(f"target_s must be >= 0, got {target_s}")
        if workers < 1 or batch_size < 1:
            raise ValueError(f"workers and batch_size must be >= 1, got {workers}, {batch_size}")
        if not (0 < deeper_at < shallower_at <= 1 and 0 < admit_at <= 1):
            raise ValueError(
                "need 0 < deeper_at < shallower_at <= 1 and 0 < admit_at <= 1,"
                f" got {deeper_at}, {shallower_at}, {admit_at}"
            )
        self.ladder = ladder
        self.target_s = target_s  # 0: no target; never moves, never refuses
        self.shallowest = ladder.shallowest(max_drop) if target_s > 0 else 0
        self.workers, self.batch_size = workers, batch_size
        self.shallower_at, self.deeper_at, self.hold_s = shallower_at, deeper_at, hold_s
        self.admit_at = admit_at
        self.smooth_s = smooth_s
        self._level: float | None = None  # inputs queued or in flight, smoothed
        self.costs = CostModel(memory_s)
        self.point = 0
        self._clear_since: float | None = None  # when the point above became affordable
        self._last: float | None = None  # time of the last update
        self.degraded_s = 0.0  # time spent below point 0

    @property
    def enabled(self) -> bool:
        return self.target_s > 0

    def work(self, inputs: int, layers_run: int) -> float:
        """Work done by `inputs` inputs that ran `layers_run` layers in all."""
        return inputs * self.ladder.fixed_cost + layers_run

    def observe(self, work: float, seconds: float) -> None:
        """A worker spent `seconds` on one batch (or layer step) of `work` layer units."""
        self.costs.observe(work, seconds)

    def expected_latency(self, inputs: float, k: int | None = None) -> float:
        """Seconds until `inputs` inputs (what is queued and in flight, plus a new
        request's) are answered, served at point k (default: the current one)."""
        fit = self.costs.fitted
        if fit is None or inputs <= 0:
            return 0.0  # nothing measured yet: no grounds to refuse or move
        a, b = fit
        cost = self.ladder.cost(self.point if k is None else k)
        # The work ahead is shared by the workers; the batch the last input rides in
        # is not (one worker runs it from start to end).
        own = min(inputs, self.batch_size)
        ahead = inputs - own
        drain = (math.ceil(ahead / self.batch_size) * a + ahead * cost * b) / self.workers
        return drain + a + own * cost * b

    def update(self, inputs: int, now: float) -> int:
        """Choose the point for `inputs` queued or in flight at time `now`; the point.

        Moves follow the load smoothed over `smooth_s`: a Poisson stream near capacity
        has bursts that fill the queue for a moment, which are not overload, while a
        real overload keeps the queue up and is followed within a few `smooth_s`.
        Admission (`refusal`) reads the queue as it is.
        """
        dt = 0.0 if self._last is None else max(0.0, now - self._last)
        if self.point > 0:
            self.degraded_s += dt
        self._last = now
        keep = math.exp(-dt / self.smooth_s) if self._level is not None else 0.0
        level = self._level = keep * (self._level or 0.0) + (1.0 - keep) * inputs
        if not self.enabled or self.shallowest == 0:
            return self.point
        was = self.point
        high = self.shallower_at * self.target_s
        # Below one input queued on average there is no queue to clear: the estimate is
        # one input's own service time, which no point of the ladder is there to cut
        # (an `a` fitted under a burst's contention kept the way up closed for good).
        queued = level >= 1.0
        if queued and self.point < self.shallowest and self.expected_latency(level) > high:
            k = self.point + 1
            while k < self.shallowest and self.expected_latency(level, k) > high:
                k += 1
            self.point, self._clear_since = k, None
        elif self.point > 0 and (
            not queued
            or self.expected_latency(level, self.point - 1) < self.deeper_at * self.target_s
        ):
            if self._clear_since is None:
                self._clear_since = now
            elif now - self._clear_since >= self.hold_s:
                self.point -= 1
                self._clear_since = now if self.point > 0 else None
        else:
            self._clear_since = None
        if self.point != was:
            p = self.ladder.points[self.point]
            log.info(
                "operating point %d -> %d (expected latency %.0f ms at %.0f inputs;"
                " calibration accuracy %.2f%%, mean depth %.2f)",
                was,
                self.point,
                1000 * self.expected_latency(level),
                level,
                100 * p.accuracy,
                p.mean_layers,
            )
        return self.point

    def next_check(self, now: float) -> float | None:
        """Seconds until the controller wants another `update` though nothing happens
        (below point 0: the way back up is timed); None when it does not."""
        if self.point == 0:
            return None
        if self._clear_since is None:
            return self.hold_s
        return max(0.0, self._clear_since + self.hold_s - now) + 1e-3

    def refusal(self, ahead: int, new: int, budget_s: float | None) -> float | None:
        """None to admit `new` inputs behind `ahead` queued or in flight; else the
        seconds after which a retry could be served in time. The budget is the request's
        own deadline, else the target; without either, everything is admitted.

        Less than a full batch ahead: admitted whatever the estimate says. The wait is
        then at most the batch already running, which no refusal shortens, and the
        estimate is at its least reliable: a fit left high by a burst's contention
        refused an idle server's every request, and an outlier batch just after start
        refused a handful of concurrent requests on a loaded machine (both measured).
        """
        budget = budget_s if budget_s is not None else self.target_s
        if not self.enabled or budget <= 0 or ahead < self.batch_size:
            return None
        wait = self.expected_latency(ahead + new, self.shallowest)
        if wait <= self.admit_at * budget:
            return None
        return wait - self.admit_at * budget

    def state(self, inputs: int) -> dict[str, float]:
        """What the metrics show: point, its calibration accuracy and the expected wait."""
        return {
            "point": float(self.point),
            "expected_accuracy": self.ladder.points[self.point].accuracy,
            "expected_wait_s": self.expected_latency(inputs),
            "degraded_s": self.degraded_s,
        }


def controller_for(
    ladder: Ladder,
    name: str,
    latency_target_s: float,
    max_accuracy_drop: float,
    workers: int,
    max_batch_size: int,
) -> LoadController:
    """The load controller a server of model `name` runs with, and one log line that
    says what it will do under load."""
    controller = LoadController(
        ladder, latency_target_s, max_accuracy_drop, workers, max_batch_size
    )
    if not controller.enabled:
        STARTUP_LOG.info("no latency target: the calibrated thresholds serve at any load")
    elif len(ladder) == 1 and max_accuracy_drop > 0:
        STARTUP_LOG.warning(
            "%s has no operating ladder (calibrated before ladders existed): run"
            " `exitserve calibrate` to let it adapt to load",
            name,
        )
    else:
        p = ladder.points[controller.shallowest]
        STARTUP_LOG.info(
            "latency target %g ms; under load down to point %d of %d (calibration accuracy"
            " %.2f%%, mean depth %.2f)",
            1000 * latency_target_s,
            controller.shallowest,
            len(ladder) - 1,
            100 * p.accuracy,
            p.mean_layers,
        )
    return controller
