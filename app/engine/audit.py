"""Keep the calibration promise on the live stream: audit a sample of the answers against
the last exit, keep a live bound on disagreement, and tighten the exits when it breaks.

Calibration promises that the answers agree with the last exit's on all but
`max_disagreement` of inputs (a 95% Clopper-Pearson upper bound on its split). Text
drifts; the promise can break on the live stream without anything noticing. So:

- A sample of the answers given at the model's own exits (requests that set no
  `threshold` or `max_layers`) is run again through every exit, off the request's path
  (after it is answered, by a worker with nothing queued or with a backlog of audits):
  the rate is `rate` while the server is busy, five times that while it idles, none
  while it is below its calibrated operating point under load.
- Each audited input keeps its confidence and label at every exit, so the window of the
  last `window` audits tells what *any* thresholds would have answered for them, not
  only those in use when they were served. The live bound is the 95% upper bound on
  disagreement with the last exit, over the window, at the thresholds in use now.
- Tightening (level k): every intermediate threshold t moves to 1 - (1 - t) / 2^k. The
  exits tighten on evidence that the promise is broken: the 95% *lower* bound at the
  current level above it (with at least `min_audited` in the window); then to the first
  level whose upper bound keeps the promise. They relax to the first lower level whose
  upper bound keeps it. Between the two bounds nothing moves, so the level does not
  flap. Why not tighten on the upper bound: calibration set the thresholds where the
  upper bound over its 1,275 sentences just kept the promise (2.2% observed, 3%
  promised); over a smaller live window of the very same kind of text the upper bound
  is wider and passes 3%: on 1,000 plain test sentences that rule tightened (a false
  alarm), this one did not. It never goes below level 0, the calibrated thresholds.
  Every move is logged with its evidence.

The audit itself is pure (no threads, no torch); the engine feeds it.
"""

from __future__ import annotations

import logging
import random
import threading
from collections import deque
from collections.abc import Sequence

import numpy as np

from app.network import exit_rule
from app.network.exit_rule import exit_layers
from app.stats import binomial_lower_bound, binomial_upper_bound

log = logging.getLogger(__name__)

IDLE_BOOST = 5.0  # the sampling rate's multiple while the server has nothing queued


def tightened(thresholds: Sequence[float], level: int) -> list[float]:
    """The thresholds at a level of strictness: intermediate exits move towards 1 (the
    last exit answers whatever its threshold); a threshold of 1 (never) stays."""
    if level <= 0:
        return list(thresholds)
    f = 0.5**level
    last = len(thresholds) - 1
    return [t if i == last or t >= 1.0 else 1.0 - (1.0 - t) * f for i, t in enumerate(thresholds)]


class Audit:
    def __init__(
        self,
        thresholds: Sequence[float],
        promise: float | None,
        rate: float = 0.02,
        window: int = 2000,
        min_audited: int = 200,
        levels: int = 6,
        every: int = 50,
        seed: int | None = None,
    ) -> None:
        """`thresholds`: the calibrated ones (level 0); `promise`: calibration's
        max_disagreement (None: the audit reports, never moves)."""
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate must be in [0, 1], got {rate}")
        if window < 1 or min_audited < 1 or levels < 0 or every < 1:
            raise ValueError("window, min_audited and every must be >= 1, levels >= 0")
        self.thresholds = list(thresholds)
        self.promise = promise
        self.rate, self.window, self.min_audited = rate, window, min_audited
        self.levels, self.every = levels, every
        self.level = 0
        self.audited = 0  # every audited answer
        self.disagreed = 0  # ... whose served label was not the last exit's
        self.moves = {"tighten": 0, "relax": 0}
        self.bound: float | None = None  # 95% upper bound at the current level, over the window
        self.lower: float | None = None  # ... and lower bound
        self._conf: deque[np.ndarray] = deque(maxlen=window)  # (L,) confidence per exit
        self._labels: deque[np.ndarray] = deque(maxlen=window)  # (L,) answer per exit
        self._since = 0  # records since the last decision
        self._lock = threading.Lock()
        self._random = random.Random(seed)

    def rate_now(self, idle: bool, degraded: bool) -> float:
        """The share of answers to audit now: none below the calibrated point (the server
        is short of capacity), more while it idles."""
        if degraded:
            return 0.0
        return min(1.0, self.rate * IDLE_BOOST) if idle else self.rate

    def wants(self, idle: bool, degraded: bool) -> bool:
        return self._random.random() < self.rate_now(idle, degraded)

    def apply(self, thresholds: Sequence[float]) -> list[float]:
        """An operating point's thresholds at the current level."""
        return tightened(thresholds, self.level)

    def record(
        self, probs: np.ndarray, served_exit: int, measure: str = "max_softmax"
    ) -> tuple[bool, str | None]:
        """One audited answer: `probs` (L, C) at every exit, `served_exit` the 1-based exit
        it was answered at. Returns (whether its answer differed from the last exit's, the
        move made now: "tighten", "relax" or None)."""
        conf = exit_rule.confidences(probs, measure)
        labels = exit_rule.answers(probs, measure != "max_softmax")
        differed = bool(labels[served_exit - 1] != labels[-1])
        with self._lock:
            self.audited += 1
            self.disagreed += differed
            self._conf.append(conf)
            self._labels.append(labels)
            self._since += 1
            move = None
            if self._since >= self.every:
                self._since = 0
                move = self._decide()
        return differed, move

    def _window(self) -> tuple[np.ndarray, np.ndarray]:
        """The window as arrays: confidences and labels, (L, n) each."""
        return np.stack(self._conf, axis=1), np.stack(self._labels, axis=1)

    def disagreements(
        self, level: int, window: tuple[np.ndarray, np.ndarray] | None = None
    ) -> tuple[int, int]:
        """(disagreeing, audited) over the window (`_window()`, unless given), had the
        thresholds been at `level`."""
        if not self._conf:
            return 0, 0
        conf, labels = self._window() if window is None else window
        exits = exit_layers(conf, np.asarray(tightened(self.thresholds, level)))
        served = labels[exits, np.arange(conf.shape[1])]
        return int((served != labels[-1]).sum()), conf.shape[1]

    def _decide(self) -> str | None:
        """Re-read the window; move the level if the promise asks for it (lock held)."""
        n = len(self._conf)
        if n == 0:
            return None
        window = self._window()  # stacked once for every level weighed below

        def upper(level: int) -> float:
            return binomial_upper_bound(*self.disagreements(level, window))

        def bounds() -> tuple[int, int]:
            k, n = self.disagreements(self.level, window)
            self.bound, self.lower = binomial_upper_bound(k, n), binomial_lower_bound(k, n)
            return k, n

        k, n = bounds()
        if self.promise is None or n < self.min_audited:
            return None
        assert self.lower is not None
        before = self.level
        if self.lower > self.promise:
            stricter = range(self.level + 1, self.levels + 1)
            self.level = next((j for j in stricter if upper(j) <= self.promise), self.levels)
        else:
            laxer = range(self.level)
            self.level = next((j for j in laxer if upper(j) <= self.promise), self.level)
        if self.level == before:
            return None
        move = "tighten" if self.level > before else "relax"
        self.moves[move] += 1
        log.warning(
            "audit: %s from level %d to %d: %d of the last %d audited answers disagree with the"
            " last exit at level %d (95%% bounds %.4f-%.4f, promise %.4f); thresholds now %s",
            move, before, self.level, k, n, before, self.lower, self.bound, self.promise,
            [round(t, 4) for t in self.apply(self.thresholds)],
        )  # fmt: skip
        bounds()
        return move

    def state(self) -> dict[str, object]:
        with self._lock:
            window = self._window() if self._conf else None
            k, n = self.disagreements(self.level, window)
            k0, _ = self.disagreements(0, window)
            return {
                "rate": self.rate,
                "window": self.window,
                "promise": self.promise,
                "level": self.level,
                "thresholds": [round(t, 6) for t in self.apply(self.thresholds)],
                "audited": self.audited,
                "disagreed": self.disagreed,
                "window_audited": n,
                "window_disagreeing": k,
                "window_disagreeing_calibrated": k0,  # had the calibrated thresholds served
                "bound": self.bound,
                "lower_bound": self.lower,
                "moves": dict(self.moves),
            }
