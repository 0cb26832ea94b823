"""The layer loop: run a batch layer by layer, answer each row at its own exit.

After every layer each still-running row is scored by that layer's exit head; rows
that are confident enough (or reached their depth cap) are answered at once through
`on_answer`, and the batch is compacted: finished rows are dropped (and, padded on a
GPU, padding is trimmed to the longest remaining row), so deeper layers only pay for
what is left.
This module knows the backend interface (`app.network.backends`) and nothing about
HTTP or JSON.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from app.network import exit_rule
from app.network.backends import Backend
from app.network.exit_rule import Prediction, Row

__all__ = ["BatchResult", "Prediction", "Row", "decide_on_logits", "run_batch", "run_whole"]


@dataclass
class BatchResult:
    predictions: list[Prediction]
    rows_per_layer: list[int] = field(default_factory=list)  # rows that ran each layer step
    tokens_per_layer: list[int] = field(default_factory=list)  # token positions per layer step


def run_batch(
    backend: Backend,
    rows: Sequence[Row],
    on_answer: Callable[[int, Prediction], None] | None = None,
    wide: bool = False,
    whole: bool = False,
) -> BatchResult:
    """Run `rows` through the network with per-row early exit.

    Returns predictions in input order; `on_answer(index, prediction)` fires as soon as a
    row leaves, before deeper layers run for the rest of the batch. `wide`: a row alone
    may take the threads of idle workers (`Backend.run_alone`). `whole`: every layer on
    every row in one pass, the same answers given after it (`run_whole`; the engine's
    choice per batch: `app.engine.dispatch`).
    """
    exit_rule.check_rows(rows, backend.num_layers)
    out: list[Prediction | None] = [None] * len(rows)
    result = BatchResult(predictions=[])
    if not rows:
        return result

    def answer(j: int, p: Prediction) -> None:
        out[j] = p
        if on_answer is not None:
            on_answer(j, p)

    # A row alone goes through in one call where the backend can (`run_alone`); for a
    # few rows, one call each was no faster than the layer loop (docs/decisions.md).
    if whole:
        run_whole(backend, rows, answer, result)
    elif len(rows) == 1 and (alone := run_alone(backend, rows[0], wide)) is not None:
        answer(0, alone)
        n = len(rows[0].token_ids)
        result.rows_per_layer += [1] * alone.exit_layer
        result.tokens_per_layer += [n] * alone.exit_layer
    else:
        run_loop(backend, rows, answer, result)
    result.predictions = [p for p in out if p is not None]
    if len(result.predictions) != len(rows):
        raise RuntimeError("executor left rows unanswered")
    return result


def run_loop(
    backend: Backend,
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
        batch = backend.begin([rows[a].token_ids for a in alive])
        for i in range(backend.num_layers):
            result.rows_per_layer.append(batch.rows)
            result.tokens_per_layer.append(batch.tokens)
            running = [rows[a] for a in alive]
            exit = exit_rule.may_leave(i, running, backend.num_layers)
            batch = backend.step(i, batch, exit=exit)

            def answered(j: int, p: Prediction, alive: list[int] = alive) -> None:
                answer(alive[j], p)

            keep = decide_on_logits(backend, i, batch.logits, running, answered)
            if not keep:
                break
            if len(keep) < len(alive):
                alive = [alive[j] for j in keep]
                batch = backend.keep(batch, keep)


def run_whole(
    backend: Backend,
    rows: Sequence[Row],
    answer: Callable[[int, Prediction], None],
    result: BatchResult,
) -> None:
    """Every layer and every exit head on every row in one pass (`Backend.all_exits`),
    then each row answered at the first exit its own rule lets it leave at, exit by
    exit, on the same logits the layer loop would see: its answers, with one pass and
    one read of the logits where the layer loop makes one per layer. Every row ran
    every layer, and the counts say so."""
    L = backend.num_layers
    with torch.inference_mode():
        logits = backend.all_exits([r.token_ids for r in rows])  # (L, B, C)
    result.rows_per_layer += [len(rows)] * L
    result.tokens_per_layer += [sum(len(r.token_ids) for r in rows)] * L
    alive = list(range(len(rows)))
    for i in range(L):
        running = [rows[a] for a in alive]
        if not exit_rule.may_leave(i, running, L):
            continue

        def answered(j: int, p: Prediction, alive: list[int] = alive) -> None:
            answer(alive[j], p)

        index = torch.tensor(alive, device=logits.device)
        keep = decide_on_logits(backend, i, logits[i].index_select(0, index), running, answered)
        alive = [alive[j] for j in keep]
        if not alive:
            return


def run_alone(backend: Backend, row: Row, wide: bool = False) -> Prediction | None:
    """A row alone in one call through the network (`Backend.run_alone`), or
    None where the network has no such path.

    The graph applies the exit rule itself; here the rule is applied again, exit after
    exit, on the logits the graph returns and torch's scores, so the answer is exactly
    the layer loop's: a row let go earlier leaves there (the graph ran on for nothing),
    and in the rare case where the graph's softmax let it go one rounding step before
    torch's would, None: the caller runs it layer by layer.
    """
    with torch.inference_mode():
        logits = backend.run_alone(row.token_ids, row.thresholds, row.max_layers, wide)
    if logits is None:
        return None
    answer: list[Prediction] = []
    L = backend.num_layers
    for i in range(len(logits)):
        if exit_rule.may_leave(i, [row], L):
            decide_on_logits(backend, i, logits[i : i + 1], [row], lambda _, p: answer.append(p))
            if answer:
                return answer[0]
    return None


def decide_on_logits(
    backend: Backend,
    i: int,
    logits: torch.Tensor | None,
    rows: Sequence[Row],
    on_exit: Callable[[int, Prediction], None],
) -> list[int]:
    """`exit_rule.decide` on exit i's logits (k, C) for `rows` (None: the head did not
    run); the positions that go on."""
    if logits is None:
        return exit_rule.decide(i, None, rows, backend.num_layers, on_exit)
    # Scores and logits side by side, read back in one transfer (on a GPU, one sync).
    probs, raw = torch.stack([backend.probabilities(logits), logits.float()]).cpu().tolist()
    return exit_rule.decide(i, probs, rows, backend.num_layers, on_exit, backend.confidence, raw)
