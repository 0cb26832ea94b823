"""Serve your own classifier, end to end through the CLI and a real server process, on
12-layer tiny random BERT checkpoints in the standard layout: `train --base` fine-tunes
one, `add-exits` keeps another's classifier; both calibrate, serve and answer over HTTP."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.cli import main
from tests.checkpoints import reference_probs, write_checkpoint, write_data
from tests.server import server_process

pytestmark = pytest.mark.slow

TEXTS = ["a good and wonderful film", "bad , boring and awful", "the movie", "great"]


def serve(model: Path, log: Path) -> Iterator[str]:
    settings = {"model_dir": str(model), "threads": "1", "drain_timeout_s": "2"}
    with server_process(settings, log) as (url, _):
        yield url


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("own-base")
    base = write_checkpoint(root / "encoder-12", num_layers=12, max_positions=40)
    data = write_data(root / "data.csv", n=400)
    out = root / "model"
    small = ["--epochs", "2", "--qat-epochs", "1", "--batch-size", "16", "--lr", "1e-3"]
    assert main(["train", "--base", str(base), "--data", str(data), "--out", str(out), *small]) == 0
    assert main(["calibrate", str(out), "--max-drop", "0.05", "--max-disagreement", "0.2"]) == 0
    return out


def test_train_from_a_12_layer_checkpoint_serves_over_http(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = json.loads((trained / "model.json").read_text())
    assert spec["encoder"]["num_layers"] == 12 and len(spec["exits"]["thresholds"]) == 12
    assert spec["max_seq_len"] == 40  # capped at the checkpoint's positions
    assert spec["base"]["path"] == "../encoder-12"
    assert spec["calibration"]["quantization"] == "int8"
    for url in serve(trained, tmp_path / "server.log"):
        r = httpx.post(f"{url}/predict", json={"inputs": TEXTS}, timeout=30)
        assert r.status_code == 200, r.text
        preds = r.json()["predictions"]
        assert [p["num_layers"] for p in preds] == [12] * len(TEXTS)
        assert all(1 <= p["exit_layer"] <= 12 and p["label"] in ("negative", "positive")
                   for p in preds)  # fmt: skip
        full = httpx.post(f"{url}/predict", timeout=30,
                          json={"inputs": TEXTS, "parameters": {"threshold": 1.0}})  # fmt: skip
        assert [p["exit_layer"] for p in full.json()["predictions"]] == [12] * len(TEXTS)
        info = httpx.get(f"{url}/info", timeout=10).json()
        assert info["num_layers"] == 12 and info["dtype"] == "int8" and info["batch_invariant"]


def test_add_exits_to_a_12_layer_classifier_keeps_its_answers_over_http(tmp_path: Path) -> None:
    cls = write_checkpoint(tmp_path / "classifier-12", num_layers=12, labels=("neg", "pos"))
    data = write_data(tmp_path / "texts.csv", n=300, labelled=False)
    out = tmp_path / "model"
    assert main(["add-exits", str(cls), "--data", str(data), "--out", str(out),
                 "--max-disagreement", "0.2"]) == 0  # fmt: skip
    original = reference_probs(cls, TEXTS)
    for url in serve(out, tmp_path / "server.log"):
        info = httpx.get(f"{url}/info", timeout=10).json()
        assert info["num_layers"] == 12 and info["dtype"] == "fp32"
        r = httpx.post(f"{url}/predict", timeout=30,
                       json={"inputs": TEXTS, "parameters": {"threshold": 1.0}})  # fmt: skip
        assert r.status_code == 200, r.text
        preds = r.json()["predictions"]
        assert [p["label"] for p in preds] == [("neg", "pos")[i] for i in original.argmax(-1)]
        assert all(p["exit_layer"] == 12 for p in preds)
        scores = [p["score"] for p in preds]
        assert scores == pytest.approx(original.max(-1).values.tolist(), abs=1e-5)
        r = httpx.post(f"{url}/predict", json={"inputs": TEXTS}, timeout=30)
        assert r.status_code == 200 and len(r.json()["predictions"]) == len(TEXTS)
