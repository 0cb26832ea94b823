"""bench/standalone_model.py: a self-contained copy answers like the original."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from app.network import artifact
from bench.standalone_model import main
from tests.tiny import make_tiny_model, random_texts


def test_standalone_copy_has_no_base_and_the_same_answers(tmp_path: Path) -> None:
    src = make_tiny_model(tmp_path / "tiny")
    dst = tmp_path / "standalone"
    assert main([str(src), str(dst)]) == 0
    spec = json.loads((dst / "model.json").read_text())
    assert spec["base"] is None
    assert set(spec["files"]) == {"weights.safetensors", "tokenizer.json"}
    a, b = artifact.load(src), artifact.load(dst)
    ids = a.tokenizer.encode(random_texts(8, seed=3))
    assert ids == b.tokenizer.encode(random_texts(8, seed=3))
    for i, row in enumerate(ids):
        x, mask = torch.tensor([row]), torch.ones(1, len(row), dtype=torch.bool)
        la, lb = a.network(x, mask).logits, b.network(x, mask).logits
        # full weights are stored in fp16
        torch.testing.assert_close(la, lb, atol=5e-3, rtol=5e-3, msg=f"text {i}")


def test_usage_without_two_paths() -> None:
    assert main([]) == 2
