"""Batching policy as pure functions: how long a batch waits for one more arrival, and
when a row alone may borrow the idle workers' threads. The engine's worker loops call
them with what they see; tests call them with numbers."""

from __future__ import annotations


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
    arrival finds admitted, under half an input): going wide whenever another worker
    happened to be idle served fewer requests under load, since the next arrival soon
    wanted that core back (docs/decisions.md).
    """
    return arrival_load < 0.5 and not queued and not others_busy
