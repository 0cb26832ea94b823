"""The audit benchmark's shifted stream (the run itself: `python -m bench.audit`)."""

from __future__ import annotations

from bench.audit import shifted_texts


def test_shifted_texts_join_sentences_of_opposite_labels_in_both_orders() -> None:
    texts = ["good one.", "great fun!", "dull.", "a mess"]
    labels = [1, 1, 0, 0]
    out = shifted_texts(texts, labels, 6, seed=3)
    assert len(out) == 6 and out == shifted_texts(texts, labels, 6, seed=3)
    for i, t in enumerate(out):
        first, second = t.removesuffix(".").split(", but ")
        positive = {"good one", "great fun"}
        assert (first in positive) == (i % 2 == 0) and (second in positive) == (i % 2 == 1)
