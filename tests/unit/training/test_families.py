"""`exitserve add-exits` on every family it reads (DistilBERT, RoBERTa, XLM-R) and on a
multi-label classifier: full-depth answers are the original classifier's, in fp32 and
through the int8 ONNX Runtime graphs (the layer loop and a row alone in one call), and
the served API says what the model is."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from app.cli import main
from app.engine.executor import Row, run_alone, run_batch
from app.engine.runtime import load_runtime
from app.main import create_app
from app.network import artifact, exit_rule
from app.network.backends import make_backend
from app.training.evaluate import all_exit_probs, split_data
from app.training.train import TrainConfig, train
from tests.api.conftest import build_settings
from tests.checkpoints import GOOD, reference_probs, sentiment_rows, write_checkpoint, write_data

TAGS = ("positive", "long", "loud")  # a multi-label model's labels
CASES = [
    ("distilbert", False),
    ("roberta", False),
    ("xlm-roberta", False),
    ("electra", False),
    ("bert", True),
]


def write_tags(path: Path, n: int = 400) -> Path:
    """Texts with their on-tags joined by `|` (empty: none on)."""
    with path.open("w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(["text", "label"])
        for text, label in sentiment_rows(n):
            words = text.split()
            on = [label == "positive", len(words) >= 8, any(w in GOOD[:3] for w in words)]
            out.writerow([text, "|".join(t for t, o in zip(TAGS, on, strict=True) if o)])
    return path


@pytest.fixture(scope="module", params=CASES, ids=[f"{f}{'-multi' if m else ''}" for f, m in CASES])
def made(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    family, multi = request.param
    root = tmp_path_factory.mktemp(family)
    labels = TAGS if multi else ("negative", "positive")
    cls = write_checkpoint(root / "classifier", num_layers=3, labels=labels, family=family,
                           multi_label=multi, seed=7)  # fmt: skip
    data = write_tags(root / "data.csv") if multi else write_data(root / "data.csv", n=400)
    out = root / "model"
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert main(["add-exits", str(cls), "--data", str(data), "--out", str(out),
                     "--max-disagreement", "0.2", "--max-drop", "0.2"]) == 0  # fmt: skip
    return family, multi, cls, out, [json.loads(line) for line in printed.getvalue().splitlines()]


def full_depth(L: int) -> list[float]:
    return [1.0] * (L - 1) + [0.0]


def test_full_depth_is_the_original_classifier_in_fp32_and_int8(made: tuple) -> None:
    family, multi, cls, out, _ = made
    spec = artifact.read_spec(out)
    assert spec.config.encoder.architecture == family and spec.config.multi_label == multi
    assert spec.confidence == ("label_set_probability" if multi else "max_softmax")
    texts, _ = split_data(spec, "test")
    want = reference_probs(cls, texts)
    want_answers = exit_rule.answers(want.numpy(), multi)
    rt = load_runtime(out, "cpu", "none")
    L = rt.num_layers
    rows = [Row(r, full_depth(L), L) for r in rt.tokenize(texts)]
    preds = run_batch(rt.backend, rows).predictions
    got = torch.tensor([p.probs for p in preds])
    # fp32 in another summation order (packed batches) than the one-text reference;
    # the random heads are made sharp, so 1e-7 in the states can be 1e-5 here.
    torch.testing.assert_close(got, want, atol=5e-5, rtol=0)
    assert (exit_rule.answers(got.numpy(), multi) == want_answers).all()
    raw = torch.tensor([p.logits for p in preds])
    scores = torch.sigmoid(raw) if multi else torch.softmax(raw, -1)
    torch.testing.assert_close(scores, got, atol=1e-6, rtol=0)
    # int8: the ONNX Runtime graphs (ReLU heads and sigmoids included) compute what the
    # eager int8 kernels compute. (How far int8 moves a random tiny model's answers says
    # nothing of a trained one's: bench/families.py measures real ones.)
    graphs = load_runtime(out, "cpu", "int8")
    assert graphs.kernel == "onnxruntime"
    eager = make_backend(artifact.load(out).network, "cpu", "int8", "torch")
    want8 = all_exit_probs(eager, [r.token_ids for r in rows])[-1]
    got8 = np.array([p.probs for p in run_batch(graphs.backend, rows).predictions])
    # The same numerics, not the same kernels: a rounding flip in an int8 activation is
    # rare, and a random tiny network magnifies it (measured: 2 rows of 40, once).
    close = np.abs(got8 - want8).max(axis=1) < 1e-4
    assert close.mean() >= 0.9, np.abs(got8 - want8).max(axis=1)
    assert (exit_rule.answers(got8, multi) == exit_rule.answers(want8, multi)).mean() >= 0.9
    calibrated = [Row(row.token_ids, spec.thresholds, L) for row in rows]
    batched = run_batch(graphs.backend, calibrated).predictions
    for row, in_batch in list(zip(calibrated, batched, strict=True))[:12]:
        # Batch invariance: alone (one graph call, the rule inside it) as in a batch.
        alone = run_alone(graphs.backend, row)
        assert alone is not None and alone == in_batch


def test_calibrated_exits_keep_the_promise_on_test(made: tuple) -> None:
    _, multi, _, out, _ = made
    spec = artifact.read_spec(out)
    ev = spec.evaluation
    assert spec.calibration["mean_layers"] <= spec.config.num_layers
    assert ev["n"] == 40 and ev["executor_consistency"] == 1.0
    if multi:  # answers are label sets, scored exactly
        _, y = split_data(spec, "test")
        assert y.max() < 2 ** len(TAGS) and len(set(y.tolist())) > 1


def test_served_answers_name_the_architecture_and_the_labels_on(made: tuple) -> None:
    family, multi, cls, out, _ = made
    settings = build_settings(out, quantization="none")
    texts = ["good great best film", "dull weak plot"]
    want = reference_probs(cls, texts)
    with TestClient(create_app(settings)) as c:
        info = c.get("/info").json()
        assert (info["architecture"], info["multi_label"]) == (family, multi)
        assert info["confidence"] == ("label_set_probability" if multi else "max_softmax")
        body = {"inputs": texts, "parameters": {"threshold": 1.0, "all_scores": True}}
        r = c.post("/predict", json=body)
        assert r.status_code == 200, r.text
        for p, w in zip(r.json()["predictions"], want.tolist(), strict=True):
            labels = list(info["labels"])
            assert np.allclose([p["scores"][n] for n in labels], w, atol=1e-5)
            if multi:
                on = [n for n, prob in zip(labels, w, strict=True) if prob >= 0.5]
                assert sorted(p["labels"]) == sorted(on)
            else:
                assert "labels" not in p
        if multi:
            r = c.post("/predict", json={"inputs": texts[0], "parameters": {
                "threshold": 1.0, "label_threshold": 0.01}})  # fmt: skip
            assert r.json()["predictions"][0]["labels"] == sorted(
                TAGS, key=lambda n: -want[0][TAGS.index(n)]
            )
            oip = c.post("/v2/models/model/infer", json={
                "inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": texts[:1]}],
                "parameters": {"threshold": 1.0}}).json()  # fmt: skip
            outputs = {o["name"]: o["data"] for o in oip["outputs"]}
            on = {n for n, prob in zip(TAGS, want[0].tolist(), strict=True) if prob >= 0.5}
            assert set(filter(None, outputs["labels"][0].split(","))) == on


@pytest.mark.parametrize("family", ["distilbert", "roberta"])
def test_a_bare_encoder_of_any_family_trains_and_serves(tmp_path: Path, family: str) -> None:
    """`train --base` on a DistilBERT or RoBERTa encoder: the artifact stores what moved
    against the base as read (RoBERTa's shifted position table, DistilBERT's zero token
    type), and loads back into the same network."""
    base = write_checkpoint(tmp_path / "base", family=family, max_positions=40)
    data = write_data(tmp_path / "data.csv", n=200)
    tc = TrainConfig(data=str(data), out=tmp_path / "model", name="m", epochs=1, qat_epochs=0,
                     batch_size=16, lr=1e-3, base=base, train_embeddings=True)  # fmt: skip
    train(tc)
    loaded = artifact.load(tmp_path / "model")
    assert loaded.spec.config.encoder.architecture == family
    assert loaded.spec.config.encoder.max_position_embeddings == 40
    state = loaded.network.state_dict()
    base_state = artifact.load_base_state(artifact.directory_base(base, tmp_path / "model"))
    assert state["encoder.embeddings.position_embeddings.weight"].shape == (40, 32)
    types = state["encoder.embeddings.token_type_embeddings.weight"]
    if family == "distilbert":
        assert types.shape == (1, 32) and float(types.abs().max()) < 1e-2  # trained from 0
    assert set(base_state) <= set(state)
    rt = load_runtime(tmp_path / "model", "cpu", "int8")
    L = rt.num_layers
    preds = run_batch(rt.backend, [Row(r, full_depth(L), L) for r in rt.tokenize(["a b c"])])
    assert preds.predictions[0].exit_layer == L
