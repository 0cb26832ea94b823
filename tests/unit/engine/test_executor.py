"""The layer loop: per-row early exit inside a batch, with compaction."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from app.engine.executor import BatchResult, run_batch
from app.network import artifact
from app.network.backends import Backend, PackedTorch, Padded, RunningBatch, make_backend
from app.network.exit_rule import Prediction, Row
from app.network.exit_rule import uniform as uniform_thresholds
from app.network.quantize import int8_kernel
from app.training.evaluate import all_exit_probs
from app.training.stats import exit_layers
from tests.tiny import random_texts

L = 4
# Varied lengths, some past max_seq_len (32 tokens) so truncation is in play too.
TEXTS = random_texts(40, seed=11, min_words=1, max_words=40)


@pytest.fixture(scope="module")
def net(tiny_loaded: artifact.LoadedModel) -> Backend:
    return PackedTorch(tiny_loaded.network)


@pytest.fixture(scope="module")
def padded_net(tiny_loaded: artifact.LoadedModel) -> Backend:
    """Batches in flight run padded, as on a GPU."""
    return Padded(tiny_loaded.network)


@pytest.fixture(scope="module")
def ids(tiny_loaded: artifact.LoadedModel) -> list[list[int]]:
    return tiny_loaded.tokenizer.encode(TEXTS)


@pytest.fixture(scope="module")
def calibrated(tiny_loaded: artifact.LoadedModel) -> list[float]:
    return list(tiny_loaded.spec.thresholds)


def run(
    net,
    ids: Sequence[Sequence[int]],
    thresholds: Sequence[float] | Sequence[Sequence[float]],
    max_layers: int | Sequence[int] = L,
    on_answer: Callable[[int, Prediction], None] | None = None,
) -> BatchResult:
    per_row = isinstance(thresholds[0], (list, tuple))
    caps = max_layers if isinstance(max_layers, (list, tuple)) else [max_layers] * len(ids)
    rows = [
        Row(r, thresholds[i] if per_row else thresholds, caps[i])  # type: ignore[arg-type]
        for i, r in enumerate(ids)
    ]
    return run_batch(net, rows, on_answer)


def assert_same(got: Prediction, want: Prediction) -> None:
    assert got.label_index == want.label_index
    assert got.exit_layer == want.exit_layer
    assert got.score == pytest.approx(want.score, abs=1e-4)
    assert got.probs == pytest.approx(want.probs, abs=1e-4)


def test_tiny_model_exits_at_every_layer(net, ids, calibrated) -> None:
    # Guards the fixture: the tests below mean little if every row left at one exit.
    exits = {p.exit_layer for p in run(net, ids, calibrated).predictions}
    assert exits == {1, 2, 3, 4}


def test_batched_answers_equal_single_answers(net, ids, calibrated) -> None:
    batched = run(net, ids, calibrated).predictions
    assert len(batched) == len(ids)
    for i, row in enumerate(ids):
        [single] = run(net, [row], calibrated).predictions
        assert_same(batched[i], single)


def test_predictions_come_back_in_input_order(net, ids, calibrated) -> None:
    forward = run(net, ids, calibrated).predictions
    order = list(range(len(ids)))
    random.Random(0).shuffle(order)
    shuffled = run(net, [ids[i] for i in order], calibrated).predictions
    for pos, i in enumerate(order):
        assert_same(shuffled[pos], forward[i])


def test_score_is_the_probability_of_the_label(net, ids, calibrated) -> None:
    for p in run(net, ids, calibrated).predictions:
        assert p.score == max(p.probs) == p.probs[p.label_index]
        assert sum(p.probs) == pytest.approx(1.0, abs=1e-5)
        assert len(p.probs) == 2


def test_threshold_one_runs_every_row_to_the_last_layer(net, ids) -> None:
    res = run(net, ids, uniform_thresholds(1.0, L))
    assert [p.exit_layer for p in res.predictions] == [L] * len(ids)
    assert res.rows_per_layer == [len(ids)] * L


def test_threshold_zero_answers_every_row_at_the_first_exit(net, ids) -> None:
    res = run(net, ids, uniform_thresholds(0.0, L))
    assert [p.exit_layer for p in res.predictions] == [1] * len(ids)
    assert res.rows_per_layer == [len(ids)]


@pytest.mark.parametrize("k", range(1, L + 1))
def test_max_layers_caps_the_depth(net, ids, calibrated, k: int) -> None:
    capped = run(net, ids, calibrated, max_layers=k).predictions
    assert all(p.exit_layer <= k for p in capped)
    full = run(net, ids, calibrated).predictions
    for c, f in zip(capped, full, strict=True):
        if f.exit_layer <= k:  # the cap does not touch rows that left earlier anyway
            assert_same(c, f)


@pytest.mark.parametrize("k", range(1, L + 1))
def test_max_layers_with_threshold_one_answers_exactly_there(net, ids, k: int) -> None:
    res = run(net, ids, uniform_thresholds(1.0, L), max_layers=k)
    assert [p.exit_layer for p in res.predictions] == [k] * len(ids)
    assert len(res.rows_per_layer) == k


def test_early_exits_do_not_change_answers_that_reach_the_last_layer(net, ids, calibrated) -> None:
    adaptive = run(net, ids, calibrated).predictions
    full = run(net, ids, uniform_thresholds(1.0, L)).predictions
    deep = [(a, f) for a, f in zip(adaptive, full, strict=True) if a.exit_layer == L]
    assert deep
    for a, f in deep:
        assert_same(a, f)


def test_mixed_row_rules_in_one_batch_match_each_row_alone(net, ids, calibrated) -> None:
    rng = random.Random(3)
    choices = [
        calibrated,
        uniform_thresholds(0.0, L),
        uniform_thresholds(1.0, L),
        uniform_thresholds(0.85, L),
        [0.6, 1.0, 0.95, 0.0],
    ]
    thresholds = [rng.choice(choices) for _ in ids]
    caps = [rng.randint(1, L) for _ in ids]
    batched = run(net, ids, thresholds, max_layers=caps).predictions
    for i, row in enumerate(ids):
        [single] = run(net, [row], thresholds[i], max_layers=caps[i]).predictions
        assert_same(batched[i], single)
        assert batched[i].exit_layer <= caps[i]


def test_on_answer_fires_once_per_row_in_exit_order(net, ids, calibrated) -> None:
    calls: list[tuple[int, Prediction]] = []
    res = run(net, ids, calibrated, on_answer=lambda i, p: calls.append((i, p)))
    assert sorted(i for i, _ in calls) == list(range(len(ids)))
    layers = [p.exit_layer for _, p in calls]
    assert layers == sorted(layers)
    for i, p in calls:
        assert p is res.predictions[i]


def test_on_answer_fires_before_deeper_layers_run(net, ids, calibrated, monkeypatch) -> None:
    events: list[tuple[str, int]] = []
    step = net.step

    def logged(i: int, batch: RunningBatch, exit: bool = False) -> RunningBatch:
        events.append(("layer", i + 1))
        return step(i, batch, exit)

    monkeypatch.setattr(net, "step", logged)
    run(net, ids, calibrated, on_answer=lambda i, p: events.append(("answer", p.exit_layer)))
    for pos, (kind, n) in enumerate(events):
        if kind == "answer":
            layers_run = [m for k, m in events[:pos] if k == "layer"]
            assert max(layers_run) == n  # answered right after its own layer


def test_rows_per_layer_counts_the_rows_still_running(net, ids, calibrated) -> None:
    res = run(net, ids, calibrated)
    exits = [p.exit_layer for p in res.predictions]
    assert res.rows_per_layer == [sum(e >= k for e in exits) for k in range(1, max(exits) + 1)]
    assert res.rows_per_layer == sorted(res.rows_per_layer, reverse=True)
    assert res.rows_per_layer[0] == len(ids)


def test_tokens_per_layer_counts_real_tokens_packed(net, ids, calibrated) -> None:
    res = run(net, ids, calibrated)
    exits = [p.exit_layer for p in res.predictions]
    for k, tokens in enumerate(res.tokens_per_layer, start=1):
        assert tokens == sum(len(r) for r, e in zip(ids, exits, strict=True) if e >= k)


def test_tokens_per_layer_is_rows_times_longest_running_row_padded(
    padded_net, ids, calibrated
) -> None:
    res = run(padded_net, ids, calibrated)
    exits = [p.exit_layer for p in res.predictions]
    for k, tokens in enumerate(res.tokens_per_layer, start=1):
        running = [len(r) for r, e in zip(ids, exits, strict=True) if e >= k]
        assert tokens == len(running) * max(running)


def test_the_padded_layout_answers_as_the_packed_one(net, padded_net, ids, calibrated) -> None:
    packed = run(net, ids, calibrated).predictions
    assert run(padded_net, ids, calibrated).predictions == packed  # bit for bit


def test_padding_is_trimmed_when_the_longest_row_leaves(padded_net, tiny_loaded) -> None:
    long, *short = tiny_loaded.tokenizer.encode(
        [
            "a very long and rather boring film about nothing at all " * 3,
            "good",
            "bad film",
            "great fun",
        ]
    )
    rows = [long, *short]
    thresholds = [uniform_thresholds(0.0, L)] + [uniform_thresholds(1.0, L)] * 3
    res = run(padded_net, rows, thresholds)
    assert len(long) == 32 and max(len(r) for r in short) == 4
    assert [p.exit_layer for p in res.predictions] == [1, L, L, L]
    assert res.rows_per_layer == [4, 3, 3, 3]
    assert res.tokens_per_layer == [4 * 32, 3 * 4, 3 * 4, 3 * 4]


def test_exit_decision_matches_stats_exit_layers(net, ids, calibrated) -> None:
    probs = all_exit_probs(net, ids)  # (L, N, C), full depth
    conf, pred = probs.max(-1), probs.argmax(-1)  # (L, N)
    expected_exit = exit_layers(conf, np.array(calibrated))  # 0-based
    got = run(net, ids, calibrated).predictions
    assert [p.exit_layer for p in got] == (expected_exit + 1).tolist()
    assert [p.label_index for p in got] == pred[expected_exit, np.arange(len(ids))].tolist()


def test_empty_batch_returns_no_predictions(net) -> None:
    res = run_batch(net, [])
    assert res.predictions == [] and res.rows_per_layer == [] and res.tokens_per_layer == []


def test_wrong_threshold_count_is_rejected(net) -> None:
    with pytest.raises(ValueError, match=r"expected 4 thresholds per row, got 3"):
        run_batch(net, [Row([2, 10, 3], [0.5, 0.5, 0.0], L)])


@pytest.mark.parametrize("cap", [0, L + 1])
def test_max_layers_out_of_range_is_rejected(net, cap: int) -> None:
    with pytest.raises(ValueError, match=rf"max_layers must be in 1\.\.4, got {cap}"):
        run_batch(
            net, [Row([2, 10, 3], uniform_thresholds(0.5, L), L), Row([2, 3], [0.5] * L, cap)]
        )


def test_rows_are_validated_before_anything_runs(net) -> None:
    answered: list[int] = []
    with pytest.raises(ValueError):
        run_batch(
            net,
            [Row([2, 10, 3], uniform_thresholds(0.0, L), L), Row([2, 3], [0.5] * L, 0)],
            lambda i, p: answered.append(i),
        )
    assert answered == []


def test_network_runs_in_inference_mode(net, ids, monkeypatch) -> None:
    # No autograd graph is kept for served batches.
    seen: list[bool] = []
    step = net.step

    def spied(i: int, batch: RunningBatch, exit: bool = False) -> RunningBatch:
        seen.append(torch.is_inference_mode_enabled())
        return step(i, batch, exit)

    monkeypatch.setattr(net, "step", spied)
    run(net, ids[:2], uniform_thresholds(0.0, L))
    assert seen == [True]


# -- batch invariance of the served int8 path -------------------------------------------
@pytest.fixture(
    scope="module",
    params=[("onnxruntime", 1), ("onnxruntime", 2), ("torch", None)],
    ids=["onnxruntime-1-thread", "onnxruntime-2-threads", "torch"],
)
def int8(request, tiny_model_dir):
    """Both int8 kernels; ONNX Runtime's graphs take their intra-op threads when built."""
    kernel, threads = request.param
    if kernel == "onnxruntime" and int8_kernel() != "onnxruntime":
        pytest.skip("onnxruntime is not installed")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        return make_backend(artifact.load(tiny_model_dir).network, "cpu", "int8", kernel)
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def int8_alone(int8, ids, calibrated) -> list[Prediction]:
    return [run(int8, [row], calibrated).predictions[0] for row in ids]


def assert_identical(got: Prediction, want: Prediction) -> None:
    # Bit for bit: every op a row goes through reads that row alone (app/network/invariant.py),
    # so equality is exact, not approximate. The contract promises scores to 1e-5.
    assert (got.label_index, got.exit_layer) == (want.label_index, want.exit_layer)
    assert got.probs == want.probs


def test_int8_batched_answers_equal_single_answers(int8, ids, calibrated, int8_alone) -> None:
    batched = run(int8, ids, calibrated).predictions
    assert len({p.exit_layer for p in batched}) > 1  # the check covers mixed exits
    for got, want in zip(batched, int8_alone, strict=True):
        assert_identical(got, want)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    picks=st.lists(st.integers(0, len(TEXTS) - 1), min_size=1, max_size=24),
    threshold=st.sampled_from([None, 0.0, 0.6, 0.9, 1.0]),
    threads=st.sampled_from([1, 2]),
    pad_to=st.integers(0, 48),
)
# Text 36 (29 tokens) beside a copy of itself on 2 threads: torch's CPU flash attention
# gave it probabilities one ulp apart from its answer alone (its work split by batch and
# thread count); the math kernel does not.
@example(picks=[36, 36], threshold=0.9, threads=2, pad_to=0)
def test_int8_answer_is_independent_of_its_batch(
    int8, ids, calibrated, picks, threshold, threads, pad_to
) -> None:
    """Any batch composition, size, repetition, thread count and padding length: every row
    gets exactly its single-input answer."""
    thresholds = calibrated if threshold is None else uniform_thresholds(threshold, L)
    batch = [ids[i] for i in picks]
    # A long neighbour forces padding up to `pad_to` tokens for every shorter row.
    filler = [2] + [10] * max(0, pad_to - 2) + [3] if pad_to >= 2 else None
    rows = batch + ([filler] if filler else [])
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        batched = run(int8, rows, thresholds).predictions
        alone = [run(int8, [row], thresholds).predictions[0] for row in batch]
    finally:
        torch.set_num_threads(previous)
    for got, want in zip(batched[: len(batch)], alone, strict=True):
        assert_identical(got, want)


def test_int8_rows_keep_their_answer_as_neighbours_leave(int8, ids, calibrated, int8_alone) -> None:
    # Per-row depth caps make the batch shrink (and its padding trim) at every layer.
    caps = [1 + i % L for i in range(len(ids))]
    batched = run(int8, ids, calibrated, caps).predictions
    for i, got in enumerate(batched):
        want = run(int8, [ids[i]], calibrated, caps[i]).predictions[0]
        assert_identical(got, want)
