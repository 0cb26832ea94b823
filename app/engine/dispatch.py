"""Per-batch dispatch: run a batch layer by layer, or the whole network at once.

Layer by layer, rows leave as soon as they are confident and deeper layers run only on
what is left, but every layer ends with a device-to-host read of its exit's logits and a
decision in Python. The whole network at once runs every layer and every exit head on
every row and reads the logits back once; each row is then answered at the first exit
its rule lets it leave at, so the answers are the layer loop's (`executor.run_whole`).

On a CPU the layer loop wins at every batch size (compute dominates and the rows that
leave stop costing). On a GPU a small batch is bound by launches and host reads, not
FLOPs: there one pass is cheaper until the batch is large enough that the rows that
left early would have saved more compute than the reads cost. The choice is made per
batch from costs measured on the device at start-up (`measure`) and the exit histogram
the model's thresholds were calibrated to, so early exit never runs slower than full
depth where the costs hold. Pure arithmetic and timing; no HTTP.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

MODES = ("layers", "whole", "auto")
SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # batch sizes costs are measured at


@dataclass(frozen=True)
class Costs:
    """Seconds per batch of each size in `sizes`: the whole network with every exit
    head (`whole`), and one layer step with its exit head and host read (`layer`)."""

    sizes: tuple[int, ...]
    whole: tuple[float, ...]
    layer: tuple[float, ...]

    def __post_init__(self) -> None:
        n = len(self.sizes)
        if not n or len(self.whole) != n or len(self.layer) != n:
            raise ValueError("costs need one whole and one layer figure per size")
        if list(self.sizes) != sorted(set(self.sizes)) or self.sizes[0] < 1:
            raise ValueError(f"sizes must increase from 1 up, got {self.sizes}")

    def at(self, figures: Sequence[float], rows: float) -> float:
        """A cost at `rows` rows: linear between the measured sizes, proportional past
        the largest (compute-bound there), the smallest's below it."""
        s = self.sizes
        if rows <= s[0]:
            return figures[0]
        for k in range(1, len(s)):
            if rows <= s[k]:
                f = (rows - s[k - 1]) / (s[k] - s[k - 1])
                return figures[k - 1] + f * (figures[k] - figures[k - 1])
        return figures[-1] * rows / s[-1]


def survival(histogram: Sequence[float]) -> list[float]:
    """The share of rows still running before each layer, from the share answered at
    each exit (1-based order): [1, 1 - h1, 1 - h1 - h2, ...], one per layer."""
    total = sum(histogram)
    if total <= 0:
        raise ValueError("an exit histogram needs answers")
    alive, out = 1.0, []
    for h in histogram:
        out.append(max(alive, 0.0))
        alive -= h / total
    return out


def expected_layers(rows: int, alive: Sequence[float], costs: Costs) -> float:
    """Expected seconds layer by layer: each layer on the rows still running."""
    return sum(costs.at(costs.layer, max(1.0, rows * a)) for a in alive if rows * a > 0)


def plan(mode: str, rows: int, alive: Sequence[float] | None, costs: Costs | None) -> str:
    """ "layers" or "whole" for a batch of `rows` rows under `mode`: auto picks the one
    expected to be cheaper (layers where no costs or histogram are known)."""
    if mode != "auto":
        return mode
    if costs is None or alive is None:
        return "layers"
    whole = costs.at(costs.whole, rows)
    return "whole" if whole < expected_layers(rows, alive, costs) else "layers"


def measure(
    run_whole: Callable[[int], None],
    run_layer: Callable[[int], None],
    sizes: Sequence[int] = SIZES,
    reps: int = 3,
    clock: Callable[[], float] = time.perf_counter,
) -> Costs:
    """Time both paths at each size (the median of `reps`, after one warm run):
    `run_whole(b)` runs a batch of b rows through the whole network, `run_layer(b)` one
    layer step of b rows; each must return only once its results are on the host."""

    def median(run: Callable[[int], None], b: int) -> float:
        run(b)
        times = []
        for _ in range(reps):
            began = clock()
            run(b)
            times.append(clock() - began)
        return sorted(times)[len(times) // 2]

    return Costs(
        tuple(sizes),
        tuple(median(run_whole, b) for b in sizes),
        tuple(median(run_layer, b) for b in sizes),
    )
