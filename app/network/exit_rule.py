"""The exit rule: the one place that says which rows leave after an exit.

A row leaves exit i (0-based) when its confidence there is at least its threshold for
that exit and the threshold is below 1, or when exit i is its depth cap (`max_layers`,
1-based); the last exit always answers. So threshold 1 means "never leave here early",
also at a confidence of exactly 1.0, and 0 "leave here".

Confidence (the model's measure, `MEASURES`): for a softmax model, its largest
probability (`max_softmax`); for a multi-label model (a sigmoid per label), the
probability that its whole label set is right, each label taken as settled with
probability max(p, 1 - p) and the labels as independent: their product, in float32 from
the first label to the last (`label_set_probability`); models made before it may use
their least settled label's max(p, 1 - p) instead (`min_label_margin`), which ignores
every label but one. The answer compared across exits is the label, or for a
multi-label model the set of labels at 0.5 or above (`answers`).

The rule has three forms, written side by side so that they read as one: per row in
Python (`leaves`, `may_leave`, `decide`: the layer loop), vectorised in numpy
(`exit_layers`: calibration and evaluation), and as ONNX ops (`onnx_in_use`,
`onnx_leaves`: the one-call graph of a row alone). One table of cases runs against
every form (tests/unit/engine/test_exit_rule_table.py). Pure Python and numpy: the
engine and the API import it without torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


# -- what a request asks for -------------------------------------------------------------
@dataclass(frozen=True)
class ExitRule:
    """A request's exit settings; None means the model's calibrated default."""

    threshold: float | None = None
    max_layers: int | None = None

    @property
    def default(self) -> bool:
        """The request left its exits to the service (and so to the load controller)."""
        return self.threshold is None and self.max_layers is None

    def check(self, num_layers: int) -> None:
        """Raise ValueError, naming the field, for a rule this model cannot follow."""
        if self.max_layers is not None and not 1 <= self.max_layers <= num_layers:
            raise ValueError(f"max_layers must be in 1..{num_layers}, got {self.max_layers}")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")

    def thresholds(self, calibrated: Sequence[float], point: Sequence[float]) -> Sequence[float]:
        """The thresholds per exit a row runs with: the operating point's (`point`) when
        the request left its exits to the service; else its own threshold at every exit,
        or the calibrated ones for a request that only capped the depth."""
        if self.default:
            return point
        if self.threshold is None:
            return calibrated
        return uniform(self.threshold, len(calibrated))


def uniform(threshold: float, num_layers: int) -> list[float]:
    """One threshold at every exit."""
    return [threshold] * num_layers


# -- one row in the network ---------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    """One input: its token ids and its own exit rule."""

    token_ids: Sequence[int]
    thresholds: Sequence[float]  # per exit
    max_layers: int  # answered at this exit at the latest (1-based)


@dataclass(frozen=True)
class Prediction:
    label_index: int  # the most probable label
    score: float  # its probability
    exit_layer: int  # 1-based
    probs: tuple[float, ...]  # every label's, by the model's output (softmax or sigmoids)
    logits: tuple[float, ...] = ()  # the exit's raw scores


MEASURES = ("max_softmax", "min_label_margin", "label_set_probability")


def confidence(probs: Sequence[float], measure: str = "max_softmax") -> float:
    """A row's confidence at an exit from its (float32) probabilities there. 1 - p and
    each product are rounded to float32 as numpy and the graph compute them (a product
    of two float32 values is exact in a Python float, so one rounding gives float32's
    product), so that a tie is a tie in every form of the rule."""
    if measure == "max_softmax":
        return max(probs)
    settled = [max(p, float(np.float32(1.0 - p))) for p in probs]
    if measure == "min_label_margin":
        return min(settled)
    product = settled[0]
    for s in settled[1:]:
        product = float(np.float32(product * s))
    return product


def check_rows(rows: Sequence[Row], num_layers: int) -> None:
    """Raise ValueError before anything runs if a row's rule does not fit the model."""
    for r in rows:
        if len(r.thresholds) != num_layers:
            raise ValueError(f"expected {num_layers} thresholds per row, got {len(r.thresholds)}")
        if not 1 <= r.max_layers <= num_layers:
            raise ValueError(f"max_layers must be in 1..{num_layers}, got {r.max_layers}")


# -- the rule, per row ----------------------------------------------------------------------
def leaves(confidence: float, threshold: float, at_cap: bool) -> bool:
    """Whether a row leaves an exit (not the last) with this confidence there."""
    return at_cap or (threshold < 1.0 and confidence >= threshold)


def may_leave(i: int, rows: Sequence[Row], num_layers: int) -> bool:
    """Whether any row may leave after layer i (0-based); if none can, its exit head
    need not run."""
    return i == num_layers - 1 or any(r.thresholds[i] < 1.0 or r.max_layers <= i + 1 for r in rows)


def decide(
    i: int,
    probs: Sequence[Sequence[float]] | None,
    rows: Sequence[Row],
    num_layers: int,
    on_exit: Callable[[int, Prediction], None],
    measure: str = "max_softmax",
    logits: Sequence[Sequence[float]] | None = None,
) -> list[int]:
    """After layer i (0-based): answer the rows that leave, return the positions that go on.

    `probs` (k, C) are exit i's probabilities for `rows`, in order; None when `may_leave`
    said no row may leave here (the head did not run). `logits`, when given, go into
    the predictions as they are. Plain Python lists: for the few
    rows of a batch that is cheaper than a dozen tiny tensor ops per layer.
    """
    if probs is None:
        return list(range(len(rows)))
    last = i == num_layers - 1
    keep: list[int] = []
    for j, (r, row_probs) in enumerate(zip(rows, probs, strict=True)):
        label = max(range(len(row_probs)), key=row_probs.__getitem__)
        conf = row_probs[label] if measure == "max_softmax" else confidence(row_probs, measure)
        if last or leaves(conf, r.thresholds[i], r.max_layers <= i + 1):
            raw = tuple(logits[j]) if logits is not None else ()
            on_exit(j, Prediction(label, row_probs[label], i + 1, tuple(row_probs), raw))
        else:
            keep.append(j)
    return keep


# -- the rule, vectorised -----------------------------------------------------------------
def confidences(probs: np.ndarray, measure: str = "max_softmax") -> np.ndarray:
    """`confidence` over the last axis: (..., C) -> (...)."""
    if measure == "max_softmax":
        return probs.max(axis=-1)
    settled = np.maximum(probs, 1.0 - probs)
    if measure == "min_label_margin":
        return settled.min(axis=-1)
    product = settled[..., 0]
    for j in range(1, probs.shape[-1]):  # in label order, as `confidence` and the graph
        product = product * settled[..., j]
    return product


def answers(probs: np.ndarray, multi_label: bool = False) -> np.ndarray:
    """The answer per row as one integer (..., C) -> (...): the label's index, or for a
    multi-label model its on-labels as bits (label j on: bit j), so that two answers
    agree exactly when the integers are equal."""
    if multi_label:
        bits = np.left_shift(1, np.arange(probs.shape[-1], dtype=np.int64))
        return ((probs >= 0.5) * bits).sum(axis=-1)
    return probs.argmax(axis=-1)


def exit_layers(conf: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """0-based exit index per row: the first exit whose confidence passes its threshold.

    conf (L, N) max-softmax per exit; thresholds (L,). No depth caps: calibration and
    evaluation run every row to its own exit.
    """
    L = conf.shape[0]
    passes = (thresholds[:, None] < 1.0) & (conf >= thresholds[:, None])  # (L, N)
    passes[L - 1] = True
    return passes.argmax(axis=0)


# -- the rule, as ONNX ops ----------------------------------------------------------------
Op = Callable[..., str]  # a graph builder's op(kind, *inputs, **attrs) -> output name


def float32_thresholds(thresholds: Sequence[float]) -> np.ndarray:
    """Thresholds for a graph that compares in float32: each rounded up to the nearest
    float32 at or above it. A confidence is a float32, so `confidence >= t` holds for
    exactly the confidences at or above that float32 (rounding to nearest could move a
    threshold down onto a confidence the rule keeps)."""
    t = np.asarray(thresholds, dtype=np.float64)
    t32 = t.astype(np.float32)
    below = t32.astype(np.float64) < t
    t32[below] = np.nextafter(t32[below], np.float32(np.inf))
    return t32


def onnx_confidence(
    op: Op, logits: str, one: str, measure: str = "max_softmax", labels: int = 1
) -> str:
    """`confidence` of an exit's logits (1, `labels`) as a graph value (`one`: a float 1)."""
    if measure == "max_softmax":
        return op("ReduceMax", op("Softmax", logits, axis=-1), keepdims=0)
    p = op("Sigmoid", logits)
    settled = op("Max", p, op("Sub", one, p))  # (1, C)
    if measure == "min_label_margin":
        return op("ReduceMin", settled, keepdims=0)
    product = op("Gather", settled, op("Constant", value_int=0), axis=-1)  # (1,)
    for j in range(1, labels):  # in label order, one rounding per product
        product = op("Mul", product, op("Gather", settled, op("Constant", value_int=j), axis=-1))
    return op("ReduceMin", product, keepdims=0)  # the one value, as a scalar


def onnx_in_use(op: Op, threshold: str, one: str) -> str:
    """A threshold below 1: rows may leave at this exit by confidence (`leaves`)."""
    return op("Less", threshold, one)


def onnx_leaves(op: Op, confidence: str, threshold: str, in_use: str, at_cap: str) -> str:
    """`leaves` on graph values: a boolean that the row leaves here."""
    sure = op("And", in_use, op("GreaterOrEqual", confidence, threshold))
    return op("Or", sure, at_cap)
