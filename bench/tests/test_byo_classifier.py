"""The proof script's "original classifier" is the checkpoint's own forward pass."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.byo_classifier import original_answers
from tests.checkpoints import reference_probs, write_checkpoint
from tests.tiny import random_texts


def test_original_answers_are_the_reference_classifiers(tmp_path: Path) -> None:
    cls = write_checkpoint(tmp_path / "c", num_layers=2, labels=("a", "b", "c"), seed=2)
    texts = random_texts(30, seed=8)
    got = original_answers(cls, texts)
    want = reference_probs(cls, texts).numpy()
    assert got.shape == (30, 3)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)  # fp32, different op order
