"""Request options over HTTP: raw_scores, top_k, truncate and truncation_direction, on
/predict and as Open Inference Protocol parameters (Triton's classification extension
included)."""

from __future__ import annotations

import math
import re
from typing import Any

from fastapi.testclient import TestClient

from tests.api.helpers import assert_error, predict

LONG = " ".join(["wonderful", "dull", "plot", "acting", "great"] * 40)  # ~200 tokens, limit 32


def infer(client: TestClient, texts: list[str], outputs: list[dict[str, Any]] | None = None,
          **parameters: Any) -> dict[str, Any]:  # fmt: skip
    body: dict[str, Any] = {
        "inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": texts}],
        "parameters": parameters,
    }
    if outputs is not None:
        body["outputs"] = outputs
    r = client.post("/v2/models/tiny/infer", json=body)
    assert r.status_code == 200, r.text
    return {o["name"]: o for o in r.json()["outputs"]}


def test_raw_scores_are_the_logits_whose_softmax_is_the_probabilities(client: TestClient) -> None:
    texts = ["a wonderful film", "dull and slow", "the plot"]
    probs = predict(client, texts, all_scores=True, threshold=1.0)
    raw = predict(client, texts, all_scores=True, raw_scores=True, threshold=1.0)
    for p, r in zip(probs, raw, strict=True):
        assert (p["label"], p["exit_layer"]) == (r["label"], r["exit_layer"])
        z = sum(math.exp(v) for v in r["scores"].values())
        for label, logit in r["scores"].items():
            assert math.isclose(math.exp(logit) / z, p["scores"][label], abs_tol=1e-5)
        assert r["score"] == r["scores"][r["label"]] != p["score"]


def test_top_k_gives_the_k_best_labels_best_first(client: TestClient) -> None:
    (every,) = predict(client, "a wonderful film", all_scores=True)
    (top,) = predict(client, "a wonderful film", top_k=1)
    ranked = sorted(every["scores"].items(), key=lambda kv: -kv[1])
    assert list(every["scores"]) == client.get("/info").json()["labels"]  # label order
    assert top["scores"] == dict(ranked[:1]) and top["label"] == ranked[0][0]
    (many,) = predict(client, "a wonderful film", top_k=50)  # more than the labels: all
    assert list(many["scores"].items()) == ranked
    (plain,) = predict(client, "a wonderful film")
    assert "scores" not in plain
    for bad in (0, -1, 1.5, "2", True):
        r = client.post("/predict", json={"inputs": "x", "parameters": {"top_k": bad}})
        assert_error(r, 422)


def test_truncate_false_answers_413_naming_the_length_and_the_limit(client: TestClient) -> None:
    r = client.post("/predict", json={"inputs": ["fine", LONG], "parameters": {"truncate": False}})
    body = assert_error(r, 413, "too_large")
    found = re.search(r"an input has (\d+) tokens; the model's limit is 32", body["error"])
    assert found and int(found[1]) > 100, body
    # A text within the limit is answered; the server stays healthy.
    assert predict(client, "a short text", truncate=False)[0]["label"]
    assert client.get("/readyz").status_code == 200


def test_left_truncation_keeps_the_end_of_the_text(client: TestClient) -> None:
    start, end = "wonderful great " * 20, "dull awful boring " * 20
    text = start + end
    right = predict(client, text, all_scores=True, threshold=1.0)[0]["scores"]
    left = predict(client, text, all_scores=True, threshold=1.0, truncation_direction="left")
    assert right == predict(client, start, all_scores=True, threshold=1.0)[0]["scores"]
    assert left[0]["scores"] == predict(client, end, all_scores=True, threshold=1.0)[0]["scores"]
    assert left[0]["scores"] != right
    r = client.post("/predict", json={"inputs": "x", "parameters": {"truncation_direction": "up"}})
    assert_error(r, 422)


def test_oip_parameters_and_triton_classification(client: TestClient) -> None:
    texts = ["a wonderful film", "dull and slow"]
    rest = predict(client, texts, all_scores=True, raw_scores=True)
    out = infer(client, texts, [{"name": "scores"}, {"name": "label"}], raw_scores=True)
    labels = list(rest[0]["scores"])  # best first; the tensor is in label order
    assert out["scores"]["shape"] == [2, len(labels)]
    info = client.get("/info").json()
    flat = [p["scores"][label] for p in rest for label in info["labels"]]
    assert all(
        math.isclose(a, b, abs_tol=1e-6) for a, b in zip(out["scores"]["data"], flat, strict=True)
    )
    top = infer(client, texts, [{"name": "scores", "parameters": {"classification": 1}}])
    assert top["scores"]["datatype"] == "BYTES" and top["scores"]["shape"] == [2, 1]
    probs = predict(client, texts)
    for row, p in zip(top["scores"]["data"], probs, strict=True):
        score, index, label = row.split(":")
        assert label == p["label"] and info["labels"][int(index)] == label
        assert math.isclose(float(score), p["score"], abs_tol=1e-6)
    r = client.post("/v2/models/tiny/infer", json={
        "inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [LONG]}],
        "parameters": {"truncate": False}})  # fmt: skip
    assert re.search(r"has \d+ tokens", assert_error(r, 413, "too_large")["error"])
