"""The in-process engine benchmark (`exitserve bench`) on a tiny model: what it records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.benchmark import run
from tests.tiny import make_tiny_model_with_data


def test_every_batch_size_is_timed_and_compared(tmp_path: Path) -> None:
    model = make_tiny_model_with_data(tmp_path / "tiny")
    result = run(model, tmp_path / "out", reps=1, n1=4, n=12, batches=[4, 1], threads=1)

    assert result["threads"] == 1
    assert result["sentences"] == {"batch1": 4, "batch4": 12}
    assert set(result["sentences_per_second_median"]) == {
        f"{c}@{b}" for c in ("fp32_full", "int8_full", "int8_adaptive") for b in (1, 4)
    }
    assert all(v > 0 for v in result["sentences_per_second_median"].values())
    assert result["mean_layers"]["int8_full@4"] == 4.0  # the tiny model's depth, every row
    assert 1.0 <= result["mean_layers"]["int8_adaptive@4"] <= 4.0
    for b in (1, 4):
        med = result["sentences_per_second_median"]
        # Reported to two decimals, from unrounded medians: within about half a unit.
        assert result["ratios"][f"adaptive_vs_full_int8@{b}"] == pytest.approx(
            med[f"int8_adaptive@{b}"] / med[f"int8_full@{b}"], abs=0.006
        )

    saved = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert len(saved) == 2 and all(name.endswith(("-1t.json", "-1t.md")) for name in saved)
    stem = saved[0].rsplit(".", 1)[0]
    assert json.loads((tmp_path / "out" / f"{stem}.json").read_text()) == result
    md = (tmp_path / "out" / f"{stem}.md").read_text()
    assert "sentences timed: 4 at batch 1, 12 at batch 4 (" in md
    assert "| int8_adaptive | 4 |" in md


def test_batch_sizes_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="batch sizes"):
        run(tmp_path, tmp_path, batches=[0])
