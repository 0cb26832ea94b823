"""The batching window's decisions, as pure functions of arrival times (no clock)."""

from __future__ import annotations

import pytest

from app.engine.policy import batch_wait, next_arrival_gap

WINDOW = 0.002


def steady_gap(gap: float, n: int = 50) -> float:
    average = next_arrival_gap(float("inf"), 0.0005, WINDOW)  # one quick gap first
    for _ in range(n):
        average = next_arrival_gap(average, gap, WINDOW)
    return average


@pytest.mark.parametrize("response_s", [0.0021, 0.003, 0.004, 0.05, 10.0])
def test_a_lone_client_slower_than_the_window_never_waits(response_s: float) -> None:
    # One closed-loop client: each request arrives after the previous answer, so the
    # next one is never due inside the window; waiting would only add the window to
    # every request (it did, when such silences counted as exactly the window: after one
    # quick gap the average only crept towards the window from below).
    gap = steady_gap(response_s)
    for admitted in (0.0, 1.0, 12345.678, 1e6 + 0.1234567):
        assert batch_wait(admitted, admitted, admitted, gap, WINDOW) <= 0.0


def test_a_burst_waits_for_the_next_arrival_but_not_past_the_window() -> None:
    gap = steady_gap(0.0002)  # arrivals every 0.2 ms
    assert gap == pytest.approx(0.0002, rel=1e-3)
    # Right after an arrival, wait up to two typical gaps for the next one.
    assert batch_wait(0.0, 0.0, 0.0, gap, WINDOW) == pytest.approx(0.0004, rel=1e-3)
    # Late in the window, never past its end.
    assert batch_wait(0.0018, 0.0, 0.0017, gap, WINDOW) == pytest.approx(0.0002, rel=1e-2)
    # The next arrival is due only after the window closes: close now.
    assert batch_wait(0.0019, 0.0, 0.0019, gap, WINDOW) <= 0.0
    # Two typical gaps passed without an arrival: the burst is over.
    assert batch_wait(0.0006, 0.0, 0.0001, gap, WINDOW) <= 0.0


def test_the_average_gap_follows_a_burst_after_a_long_silence() -> None:
    average = next_arrival_gap(steady_gap(0.0002), 3600.0, WINDOW)  # an hour idle
    assert average == pytest.approx(0.8 * 0.0002 + 0.2 * 2 * WINDOW, rel=1e-3)  # capped
    for _ in range(20):
        average = next_arrival_gap(average, 0.0002, WINDOW)
    assert average == pytest.approx(0.0002, rel=0.05)
    assert batch_wait(0.0, 0.0, 0.0, average, WINDOW) > 0.0  # batching again


def test_the_first_arrival_sets_the_average() -> None:
    assert next_arrival_gap(float("inf"), 0.001, WINDOW) == 0.001
    assert batch_wait(5.0, 5.0, 5.0, float("inf"), WINDOW) <= 0.0


def test_no_wait_while_another_worker_is_idle() -> None:
    gap = 0.0001  # a burst: the next arrival is due well inside the window
    assert batch_wait(0.0, 0.0, 0.0, gap, WINDOW, idle_workers=1) > 0.0
    assert batch_wait(0.0, 0.0, 0.0, gap, WINDOW, idle_workers=2) <= 0.0
