"""The online audit's rule (`app.engine.audit`): what it samples, the live bound, and
when it tightens and relaxes the exits."""

from __future__ import annotations

import numpy as np
import pytest

from app.engine.audit import Audit, tightened
from app.stats import binomial_lower_bound, binomial_upper_bound

THRESHOLDS = [0.8, 0.8, 0.0]


def probs(*exits: tuple[int, float]) -> np.ndarray:
    """(L, 2) probabilities: at each exit the label and its probability."""
    out = np.zeros((len(exits), 2))
    for i, (label, p) in enumerate(exits):
        out[i, label], out[i, 1 - label] = p, 1 - p
    return out


# Plain: exit 1 is confident and agrees with the last exit. Shifted: exit 1 passes 0.8
# with the wrong label, exit 2 is sure and right; a level of 1 (thresholds 0.9) sends it
# on to exit 2.
PLAIN = probs((1, 0.95), (1, 0.97), (1, 0.99))
SHIFTED = probs((0, 0.85), (1, 0.97), (1, 0.99))


def feed(audit: Audit, rows: list[np.ndarray]) -> list[str]:
    moves = []
    for p in rows:
        served = 1 + int(np.argmax(p.max(axis=1) >= np.array(audit.apply(audit.thresholds))))
        _, move = audit.record(p, served)
        if move:
            moves.append(move)
    return moves


def test_tightening_moves_every_intermediate_threshold_halfway_to_one() -> None:
    assert tightened([0.8, 0.6, 1.0, 0.0], 0) == [0.8, 0.6, 1.0, 0.0]
    assert tightened([0.8, 0.6, 1.0, 0.0], 1) == pytest.approx([0.9, 0.8, 1.0, 0.0])
    assert tightened([0.8, 0.6, 1.0, 0.0], 3) == pytest.approx([0.975, 0.95, 1.0, 0.0])


def test_the_sampling_rate_follows_the_load() -> None:
    a = Audit(THRESHOLDS, 0.03, rate=0.02)
    assert a.rate_now(idle=False, degraded=False) == 0.02
    assert a.rate_now(idle=True, degraded=False) == pytest.approx(0.1)
    assert a.rate_now(idle=True, degraded=True) == 0.0
    assert Audit(THRESHOLDS, 0.03, rate=0.5).rate_now(idle=True, degraded=False) == 1.0
    a = Audit(THRESHOLDS, 0.03, rate=0.02, seed=1)
    assert 100 < sum(a.wants(False, False) for _ in range(10_000)) < 300


def test_a_shifted_stream_tightens_the_exits_and_a_plain_one_relaxes_them() -> None:
    a = Audit(THRESHOLDS, promise=0.2, window=50, min_audited=50, every=10)
    assert feed(a, [PLAIN] * 60) == [] and a.level == 0
    assert a.bound == pytest.approx(binomial_upper_bound(0, 50))
    # Half the stream shifts: at level 0 half the window disagrees; level 1 fixes it.
    assert feed(a, [SHIFTED, PLAIN] * 25) == ["tighten"]
    assert a.level == 1 and a.apply(THRESHOLDS) == pytest.approx([0.9, 0.9, 0.0])
    assert a.disagreements(0)[0] > 10 and a.disagreements(1) == (0, 50)
    assert a.audited == 110 and a.disagreed > 0  # what was served before the move
    # The window forgets the shifted stream: back to the calibrated thresholds.
    assert feed(a, [PLAIN] * 50) == ["relax"] and a.level == 0
    assert a.moves == {"tighten": 1, "relax": 1}
    state = a.state()
    assert state["level"] == 0 and state["window_audited"] == 50 and state["moves"] == a.moves


@pytest.mark.parametrize("level", [0, 1])
def test_between_the_two_bounds_nothing_moves(level: int) -> None:
    """4 of 50 disagreeing at level 0: the 95% bounds (0.028, 0.175) straddle a promise of
    0.1. No evidence that it is broken (no tightening from 0), none that it is kept (no
    relaxing from 1)."""
    a = Audit(THRESHOLDS, promise=0.1, window=50, min_audited=50, every=50)
    a.level = level
    assert feed(a, [SHIFTED] * 4 + [PLAIN] * 46) == [] and a.level == level
    assert binomial_lower_bound(4, 50) < 0.1 < binomial_upper_bound(4, 50)


def test_a_stream_that_keeps_the_promise_never_tightens() -> None:
    """2% disagreeing, a promise of 3%, a window far smaller than calibration's: the upper
    bound passes the promise (0.041 over 500), the lower one does not."""
    a = Audit(THRESHOLDS, promise=0.03, window=500, min_audited=200, every=10)
    rows = ([SHIFTED] + [PLAIN] * 49) * 20
    assert feed(a, rows) == [] and a.level == 0
    assert a.bound is not None and a.bound > 0.03 and a.lower is not None and a.lower < 0.03


def test_no_promise_no_moves_but_a_bound() -> None:
    a = Audit(THRESHOLDS, promise=None, window=20, min_audited=20, every=5)
    assert feed(a, [SHIFTED] * 40) == [] and a.level == 0
    assert a.bound == 1.0  # every audited answer disagreed


def test_it_never_goes_past_its_strictest_level() -> None:
    hopeless = probs((0, 0.999), (0, 0.999), (1, 0.99))  # sure and wrong at every early exit
    a = Audit(THRESHOLDS, promise=0.05, window=20, min_audited=20, every=20, levels=3)
    assert feed(a, [hopeless] * 40) == ["tighten"] and a.level == 3


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        Audit(THRESHOLDS, 0.03, rate=1.5)
    with pytest.raises(ValueError):
        Audit(THRESHOLDS, 0.03, window=0)
