"""Layer-wise continuous batching gives each row the answer it gets alone."""

from __future__ import annotations

import pytest

from app.engine.continuous import ContinuousBatcher
from app.engine.executor import Prediction, Row, run_batch
from app.network import artifact
from app.network.backends import PackedTorch, RunningBatch
from tests.tiny import random_texts


def alone(loaded: artifact.LoadedModel, row: Row) -> Prediction:
    return run_batch(PackedTorch(loaded.network), [row]).predictions[0]


def make_rows(loaded: artifact.LoadedModel, n: int, seed: int) -> list[Row]:
    L = PackedTorch(loaded.network).num_layers
    rules = [(list(loaded.spec.thresholds), L), ([1.0] * L, L), ([0.0] * L, L), ([1.0] * L, 2)]
    ids = loaded.tokenizer.encode(random_texts(n, seed=seed))
    return [Row(t, *rules[i % len(rules)]) for i, t in enumerate(ids)]


def drain(b: ContinuousBatcher[int], answers: dict[int, Prediction]) -> list[int]:
    def fail(key: int, e: Exception) -> None:
        raise AssertionError(f"row {key} failed: {e}")

    ran = []
    while len(b):
        ran.append(b.step(answers.__setitem__, fail))
    return ran


def test_rows_added_in_waves_get_their_single_answers(tiny_loaded: artifact.LoadedModel) -> None:
    b: ContinuousBatcher[int] = ContinuousBatcher(
        PackedTorch(tiny_loaded.network), max_batch_size=8
    )
    rows = make_rows(tiny_loaded, 30, seed=11)
    answers: dict[int, Prediction] = {}
    b.add(rows[:10], list(range(10)))
    for _ in range(2):  # the first wave goes a little deeper before the next arrives
        b.step(answers.__setitem__, lambda k, e: None)
    b.add(rows[10:20], list(range(10, 20)))
    b.step(answers.__setitem__, lambda k, e: None)
    b.add(rows[20:], list(range(20, 30)))
    drain(b, answers)
    assert sorted(answers) == list(range(30))
    for k, row in enumerate(rows):
        want = alone(tiny_loaded, row)
        got = answers[k]
        assert (got.label_index, got.exit_layer) == (want.label_index, want.exit_layer), k
        assert got.score == pytest.approx(want.score, abs=1e-4)


def test_rows_from_different_waves_share_a_layer_step(tiny_loaded: artifact.LoadedModel) -> None:
    L = PackedTorch(tiny_loaded.network).num_layers
    ids = tiny_loaded.tokenizer.encode(random_texts(8, seed=2))
    full = [Row(t, [1.0] * L, L) for t in ids]  # never leave early
    b: ContinuousBatcher[int] = ContinuousBatcher(
        PackedTorch(tiny_loaded.network), max_batch_size=32
    )
    answers: dict[int, Prediction] = {}
    b.add(full[:4], [0, 1, 2, 3])
    assert b.step(answers.__setitem__, lambda k, e: None) == 4  # wave 1: depth 0 -> 1
    b.add(full[4:], [4, 5, 6, 7])  # wave 2 enters at depth 0; wave 1 waits at depth 1
    ran = drain(b, answers)
    # Wave 2, the shallowest, runs first and catches up; from depth 1 on, one group.
    assert ran[0] == 4 and ran[1:] == [8] * (L - 1)
    assert sum(ran) + 4 == 8 * L
    assert all(a.exit_layer == L for a in answers.values())


def test_a_deep_row_runs_within_its_bound_under_a_stream_of_shallow_rows(
    tiny_loaded: artifact.LoadedModel,
) -> None:
    # The shallowest group runs first, so a new shallow row at every step would keep a
    # deep row waiting for ever; a group passed over for L steps runs next instead, so
    # each of its L layers waits at most L other steps.
    L = PackedTorch(tiny_loaded.network).num_layers
    ids = tiny_loaded.tokenizer.encode(random_texts(1 + L * L * 2, seed=5))
    b: ContinuousBatcher[int] = ContinuousBatcher(
        PackedTorch(tiny_loaded.network), max_batch_size=32
    )
    answers: dict[int, Prediction] = {}
    b.add([Row(ids[0], [1.0] * L, L)], [0])  # deep: full depth
    steps = 0
    for k, t in enumerate(ids[1:], start=1):
        b.add([Row(t, [1.0] * L, 1)], [k])  # shallow: answered at the first exit
        b.step(answers.__setitem__, lambda key, e: None)
        steps += 1
        if 0 in answers:
            break
    assert 0 in answers and answers[0].exit_layer == L
    assert steps <= L * (L + 1)


def test_groups_larger_than_the_batch_limit_are_split(tiny_loaded: artifact.LoadedModel) -> None:
    b: ContinuousBatcher[int] = ContinuousBatcher(
        PackedTorch(tiny_loaded.network), max_batch_size=5
    )
    rows = make_rows(tiny_loaded, 12, seed=4)
    b.add(rows, list(range(12)))
    answers: dict[int, Prediction] = {}
    ran = drain(b, answers)
    assert max(ran) <= 5
    assert sorted(answers) == list(range(12))


def test_a_failing_layer_fails_only_its_group(
    tiny_loaded: artifact.LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    net = PackedTorch(tiny_loaded.network)
    L = net.num_layers
    ids = tiny_loaded.tokenizer.encode(random_texts(6, seed=8))
    b: ContinuousBatcher[int] = ContinuousBatcher(net, max_batch_size=32)
    answers: dict[int, Prediction] = {}
    failed: list[int] = []
    b.add([Row(t, [1.0] * L, L) for t in ids[:3]], [0, 1, 2])
    b.step(answers.__setitem__, lambda k, e: failed.append(k))  # group 1 now at depth 1
    original = net.step

    def broken(i: int, batch: RunningBatch, exit: bool = False) -> RunningBatch:
        if i == 1:
            raise RuntimeError("boom")
        return original(i, batch, exit)

    monkeypatch.setattr(net, "step", broken)
    assert b.step(answers.__setitem__, lambda k, e: failed.append(k)) == 3  # layer 2 fails
    monkeypatch.setattr(net, "step", original)
    b.add([Row(t, [1.0] * L, L) for t in ids[3:]], [3, 4, 5])
    drain(b, answers)
    assert sorted(failed) == [0, 1, 2]
    assert sorted(answers) == [3, 4, 5]
