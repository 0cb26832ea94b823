"""The layer loop: run a batch layer by layer, answer each row at its own exit.

After every layer each still-running row is scored by that layer's exit head; rows
that are confident enough (or reached their depth cap) are answered at once through
`on_answer`, and the batch is compacted: finished rows are dropped (and, padded on a
GPU, padding is trimmed to the longest remaining row), so deeper layers only pay for
what is left.
This module knows the network's stage interface and nothing about HTTP or JSON.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from app.network.multi_exit import MultiExitNetwork


@dataclass(frozen=True)
class Row:
    """One input: its token ids and its own exit rule."""

    token_ids: Sequence[int]
    thresholds: Sequence[
        float
    ]  # per exit; a row leaves exit i when confidence >= thresholds[i] < 1
    max_layers: int  # answered at this exit at the latest (1-based)


@dataclass(frozen=True)
class Prediction:
    label_index: int
    score: float  # probability of the predicted label
    exit_layer: int  # 1-based
    probs: tuple[float, ...]


@dataclass
class BatchResult:
    predictions: list[Prediction]
    rows_per_layer: list[int] = field(default_factory=list)  # rows that ran each layer step
    tokens_per_layer: list[int] = field(default_factory=list)  # token positions per layer step


def run_batch(
    network: MultiExitNetwork,
    rows: Sequence[Row],
    on_answer: Callable[[int, Prediction], None] | None = None,
    wide: bool = False,
) -> BatchResult:
    """Run `rows` through the network with per-row early exit.

    Returns predictions in input order; `on_answer(index, prediction)` fires as soon as a
    row leaves, before deeper layers run for the rest of the batch. `wide`: a row alone
    may take the threads of idle workers (`MultiExitNetwork.run_alone`).
    """
    L = network.num_layers
    for r in rows:
        if len(r.thresholds) != L:
            raise ValueError(f"expected {L} thresholds per row, got {len(r.thresholds)}")
        if not 1 <= r.max_layers <= L:
            raise ValueError(f"max_layers must be in 1..{L}, got {r.max_layers}")
    out: list[Prediction | None] = [None] * len(rows)
    result = BatchResult(predictions=[])
    if not rows:
        return result

    def answer(j: int, p: Prediction) -> None:
        out[j] = p
        if on_answer is not None:
            on_answer(j, p)

    # A row alone goes through in one call where the network can (`run_alone`). For a
    # few rows of different lengths one call each measured no faster than the layer
    # loop, which shares its work between layers over the batch, at 3 rows and slower
    # from 4 (paired in process, one thread: 1.07x at 1 row, 1.05x at 2, 0.96x at 8).
    if len(rows) == 1 and (alone := run_alone(network, rows[0], wide)) is not None:
        answer(0, alone)
        n = len(rows[0].token_ids)
        result.rows_per_layer += [1] * alone.exit_layer
        result.tokens_per_layer += [n] * alone.exit_layer
    else:
        run_loop(network, rows, answer, result)
    result.predictions = [p for p in out if p is not None]
    if len(result.predictions) != len(rows):
        raise RuntimeError("executor left rows unanswered")
    return result


def run_loop(
    network: MultiExitNetwork,
    rows: Sequence[Row],
    answer: Callable[[int, Prediction], None],
    result: BatchResult,
) -> None:
    """The layer loop: answers through `answer(index, prediction)` as rows leave, and the
    rows and token positions of each layer step appended to `result`."""
    with torch.inference_mode():
        # Longest first: rows of one length sit together, and attention runs once per
        # length (packed on the CPU); leaving rows keep the rest in this order.
        alive = sorted(range(len(rows)), key=lambda b: -len(rows[b].token_ids))
        batch = network.begin([rows[a].token_ids for a in alive])
        for i in range(network.num_layers):
            result.rows_per_layer.append(batch.rows)
            result.tokens_per_layer.append(batch.tokens)
            running = [rows[a] for a in alive]
            batch = network.step(i, batch, exit=may_leave(network, i, running))

            def answered(j: int, p: Prediction, alive: list[int] = alive) -> None:
                answer(alive[j], p)

            keep = decide(network, i, batch.logits, running, answered)
            if not keep:
                break
            if len(keep) < len(alive):
                alive = [alive[j] for j in keep]
                batch = network.keep(batch, keep)


def run_alone(network: MultiExitNetwork, row: Row, wide: bool = False) -> Prediction | None:
    """A row alone in one call through the network (`MultiExitNetwork.run_alone`), or
    None where the network has no such path.

    The graph applies the exit rule itself; here `decide` applies it again, exit after
    exit, on the logits the graph returns, so the answer is exactly the layer loop's:
    a row that `decide` lets go earlier leaves there (the graph ran on for nothing), and
    in the rare case where the graph's softmax let it go one rounding step before
    `decide` would, None: the caller runs it layer by layer.
    """
    with torch.inference_mode():
        logits = network.run_alone(row.token_ids, row.thresholds, row.max_layers, wide)
    if logits is None:
        return None
    answer: list[Prediction] = []
    for i in range(len(logits)):
        if may_leave(network, i, [row]):
            decide(network, i, logits[i : i + 1], [row], lambda _, p: answer.append(p))
            if answer:
                return answer[0]
    return None


def may_leave(network: MultiExitNetwork, i: int, rows: Sequence[Row]) -> bool:
    """Whether any row may leave after layer i (0-based); if none can, its exit head is
    not run."""
    return i == network.num_layers - 1 or any(
        r.thresholds[i] < 1.0 or r.max_layers <= i + 1 for r in rows
    )


def decide(
    network: MultiExitNetwork,
    i: int,
    logits: torch.Tensor | None,
    rows: Sequence[Row],
    on_exit: Callable[[int, Prediction], None],
) -> list[int]:
    """After layer i (0-based): answer the rows that leave, return the positions that go on.

    `logits` (k, C) are exit i's for `rows`, in order; None when `may_leave` said no row
    may leave here (the head did not run). The decisions run on Python lists: for the
    few rows of a batch that is cheaper than a dozen tiny tensor ops per layer, which
    dominate at batch 1.
    """
    if logits is None:
        return list(range(len(rows)))
    last = i == network.num_layers - 1
    probs = torch.softmax(logits.float(), dim=-1).cpu().tolist()
    keep: list[int] = []
    for j, (r, row_probs) in enumerate(zip(rows, probs, strict=True)):
        label = max(range(len(row_probs)), key=row_probs.__getitem__)
        conf, t = row_probs[label], r.thresholds[i]
        if last or (t < 1.0 and conf >= t) or r.max_layers <= i + 1:
            on_exit(j, Prediction(label, conf, i + 1, tuple(row_probs)))
        else:
            keep.append(j)
    return keep


def uniform_thresholds(threshold: float, num_layers: int) -> list[float]:
    """One confidence threshold at every intermediate exit."""
    return [threshold] * num_layers
