"""Whole passes by shape bucket (`backends.graphs`): the bucketing, the filler rows and
positions, and that a bucketed pass gives what an unbucketed one gives. On the CPU the
runner is an eager call; graph capture and replay run on a GPU only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.network import artifact
from app.network.backends import Padded
from app.network.backends.base import Backend
from app.network.backends.graphs import WholeGraphs, bucket
from app.network.multi_exit import pad_batch
from app.network.quantize import prepare_model
from tests.tiny import random_texts


def test_bucket_is_the_smallest_that_holds() -> None:
    assert [bucket(n, (1, 2, 4, 8)) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, None]


def test_buckets_end_at_the_largest_batch_and_the_model_limit(
    tiny_loaded: artifact.LoadedModel,
) -> None:
    g = WholeGraphs(tiny_loaded.network, max_rows=48)
    assert g.rows == (1, 2, 4, 8, 16, 32, 48)
    assert g.lengths == (16, 32)  # the tiny model reads 32 tokens at most
    assert not g.capture and g.captured == 0  # the CPU: eager runners


@pytest.fixture(scope="module")
def padded(tiny_model_dir: Path) -> Padded:
    return Padded(prepare_model(artifact.load(tiny_model_dir).network, "cpu", "none"))


def test_a_bucketed_pass_is_the_layer_by_layer_one(
    tiny_loaded: artifact.LoadedModel, padded: Padded
) -> None:
    """3, 5 and 9 rows of mixed lengths: padded up to 4, 8 and 16 rows and 16 or 32
    positions, filler rows dropped; the logits of every exit are those of the layer
    steps (fp32 sums in another order for another number of rows: 1e-6 apart)."""
    for n in (3, 5, 9):
        ids = tiny_loaded.tokenizer.encode(random_texts(n, seed=n, min_words=1, max_words=25))
        whole = padded.all_exits(ids)
        steps = Backend.all_exits(padded, ids)
        assert whole.shape == (padded.num_layers, n, 2)
        torch.testing.assert_close(whole, steps, atol=1e-5, rtol=0)
    used = set(padded.graphs._runners)
    assert used <= {(b, t) for b in (4, 8, 16) for t in (16, 32)} and len(used) >= 3


def test_a_batch_above_every_bucket_runs_eagerly(
    tiny_loaded: artifact.LoadedModel, tiny_model_dir: Path
) -> None:
    net = prepare_model(artifact.load(tiny_model_dir).network, "cpu", "none")
    g = WholeGraphs(net, max_rows=2)
    ids, mask = pad_batch(tiny_loaded.tokenizer.encode(random_texts(3, seed=5)))
    with torch.inference_mode():
        assert torch.equal(g(ids, mask), net(ids, mask).logits)
    assert not g._runners
