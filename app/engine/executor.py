"""The layer loop: run a batch layer by layer, answer each row at its own exit.

After every layer each still-running row is scored by that layer's exit head; rows
that are confident enough (or reached their depth cap) are answered at once through
`on_answer`, and the batch is compacted: finished rows are dropped and padding is
trimmed to the longest remaining row, so deeper layers only pay for what is left.
This module knows the network's stage interface and nothing about HTTP or JSON.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from app.network.multi_exit import MultiExitNetwork, pad_batch


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
    tokens_per_layer: list[int] = field(default_factory=list)  # padded tokens per layer step


def run_batch(
    network: MultiExitNetwork,
    rows: Sequence[Row],
    on_answer: Callable[[int, Prediction], None] | None = None,
) -> BatchResult:
    """Run `rows` through the network with per-row early exit.

    Returns predictions in input order; `on_answer(index, prediction)` fires as soon as a
    row leaves, before deeper layers run for the rest of the batch.
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
    device = network.device
    with torch.inference_mode():
        ids, mask = pad_batch([list(r.token_ids) for r in rows], device=device)  # (B, T)
        thr = torch.tensor([list(r.thresholds) for r in rows], dtype=torch.float32, device=device)
        cap = torch.tensor([r.max_layers for r in rows], device=device)  # (B,)
        alive = torch.arange(len(rows), device=device)  # original index of each running row
        x = network.embed(ids)  # (B, T, H)
        bias = network.attention_bias(mask)
        for i in range(L):
            result.rows_per_layer.append(int(x.shape[0]))
            result.tokens_per_layer.append(int(x.shape[0] * x.shape[1]))
            x = network.layer(i, x, bias)
            if i < L - 1 and not bool(((thr[:, i] < 1.0) | (cap <= i + 1)).any()):
                continue  # no row may leave here: skip the exit head
            probs = torch.softmax(network.exit_logits(i, x, mask).float(), dim=-1)  # (B, C)
            conf, pred = probs.max(dim=-1)  # (B,), (B,)
            t = thr[:, i]
            done = ((conf >= t) & (t < 1.0)) | (cap <= i + 1)
            if i == L - 1:
                done[:] = True
            done_idx = done.nonzero().flatten().tolist()
            if done_idx:
                probs_cpu, pred_cpu = probs.cpu(), pred.cpu()
                alive_cpu = alive.cpu()
                for j in done_idx:
                    p = Prediction(
                        label_index=int(pred_cpu[j]),
                        score=float(probs_cpu[j, pred_cpu[j]]),
                        exit_layer=i + 1,
                        probs=tuple(probs_cpu[j].tolist()),
                    )
                    index = int(alive_cpu[j])
                    out[index] = p
                    if on_answer is not None:
                        on_answer(index, p)
            if bool(done.all()):
                break
            keep = ~done
            x, mask, thr, cap, alive = x[keep], mask[keep], thr[keep], cap[keep], alive[keep]
            T = int(mask.sum(dim=1).max())  # right padding: columns past T are padding for all
            x, mask = x[:, :T], mask[:, :T]
            bias = network.attention_bias(mask)
    result.predictions = [p for p in out if p is not None]
    if len(result.predictions) != len(rows):
        raise RuntimeError("executor left rows unanswered")
    return result


def uniform_thresholds(threshold: float, num_layers: int) -> list[float]:
    """One confidence threshold at every intermediate exit."""
    return [threshold] * num_layers
