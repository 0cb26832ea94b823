"""POST /predict: answers, their order, and the exit rules a request may set."""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Callable
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.api.predict import timing_headers
from app.engine.requests import Answer
from tests.api.conftest import async_client
from tests.api.helpers import metric_samples, predict, predictions, sample
from tests.tiny import random_texts

TEXTS = random_texts(12, seed=7)


def same_answer(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["label"] == b["label"], (a, b)
    assert a["exit_layer"] == b["exit_layer"], (a, b)
    assert a["num_layers"] == b["num_layers"], (a, b)
    # The int8 path is batch-invariant bit for bit; JSON carries the float exactly.
    assert a["score"] == b["score"], (a, b)


def test_single_string(client: TestClient, model_info: dict[str, Any]) -> None:
    r = client.post("/predict", json={"inputs": "a good movie"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == model_info["model"]
    assert body["model_version"] == model_info["model_version"]
    (p,) = body["predictions"]
    L = model_info["num_layers"]
    assert p["label"] in model_info["labels"]
    assert 0.0 <= p["score"] <= 1.0
    assert 1 <= p["exit_layer"] <= L
    assert p["num_layers"] == L
    assert "scores" not in p


def test_list_answers_in_input_order(client: TestClient, model_info: dict[str, Any]) -> None:
    batch = predict(client, TEXTS)
    assert len(batch) == len(TEXTS)
    for text, answer in zip(TEXTS, batch, strict=True):
        (alone,) = predict(client, text)
        same_answer(answer, alone)
        assert answer["label"] in model_info["labels"]
        assert 0.0 <= answer["score"] <= 1.0
        assert 1 <= answer["exit_layer"] <= model_info["num_layers"]


def test_list_of_one_equals_string(client: TestClient) -> None:
    same_answer(predict(client, [TEXTS[0]])[0], predict(client, TEXTS[0])[0])


@pytest.mark.parametrize("threshold", [None, 0.0, 0.6, 1.0])
def test_batched_equals_single_under_each_threshold(
    client: TestClient, threshold: float | None
) -> None:
    params = {} if threshold is None else {"threshold": threshold}
    batch = predict(client, TEXTS, **params)
    for text, answer in zip(TEXTS, batch, strict=True):
        same_answer(answer, predict(client, text, **params)[0])


def test_all_scores(client: TestClient, model_info: dict[str, Any]) -> None:
    for p in predict(client, TEXTS[:4], all_scores=True):
        scores = p["scores"]
        assert list(scores) == model_info["labels"]
        assert math.fsum(scores.values()) == pytest.approx(1.0, abs=1e-4)
        assert all(0.0 <= v <= 1.0 for v in scores.values())
        assert scores[p["label"]] == pytest.approx(p["score"], abs=1e-6)
        assert p["score"] == pytest.approx(max(scores.values()), abs=1e-6)
    for p in predict(client, TEXTS[:4], all_scores=False):
        assert "scores" not in p


def test_threshold_one_runs_full_depth(client: TestClient, model_info: dict[str, Any]) -> None:
    L = model_info["num_layers"]
    assert [p["exit_layer"] for p in predict(client, TEXTS, threshold=1.0)] == [L] * len(TEXTS)


def test_threshold_zero_leaves_at_first_exit(client: TestClient) -> None:
    assert [p["exit_layer"] for p in predict(client, TEXTS, threshold=0.0)] == [1] * len(TEXTS)


def test_max_layers_is_honoured(client: TestClient, model_info: dict[str, Any]) -> None:
    L = model_info["num_layers"]
    for k in range(1, L + 1):
        capped = predict(client, TEXTS, max_layers=k)
        assert all(1 <= p["exit_layer"] <= k for p in capped), (k, capped)
        forced = predict(client, TEXTS, threshold=1.0, max_layers=k)
        assert [p["exit_layer"] for p in forced] == [k] * len(TEXTS)
    full = predict(client, TEXTS, threshold=1.0)
    for p, q in zip(predict(client, TEXTS, threshold=1.0, max_layers=L), full, strict=True):
        same_answer(p, q)


def test_default_thresholds_exit_early_somewhere(
    client: TestClient, model_info: dict[str, Any]
) -> None:
    # The tiny model's calibrated thresholds let some inputs leave before the last layer,
    # so the per-row exit path is really exercised (not only full depth).
    exits = [p["exit_layer"] for p in predict(client, random_texts(48, seed=3))]
    assert min(exits) < model_info["num_layers"]


def test_timing_headers(client: TestClient) -> None:
    r = client.post("/predict", json={"inputs": TEXTS[:3]})
    assert r.status_code == 200
    values = {h: float(r.headers[h]) for h in ("x-queue-time", "x-inference-time", "x-total-time")}
    assert all(v >= 0.0 and math.isfinite(v) for v in values.values()), values
    assert values["x-total-time"] >= values["x-inference-time"]


def test_long_text_is_truncated_not_rejected(
    client: TestClient, model_info: dict[str, Any]
) -> None:
    long = "good movie " * 5000  # 55,000 characters, far past the sequence limit
    (p,) = predict(client, long)
    assert p["label"] in model_info["labels"]
    # Truncation keeps the head: the same answer as a text already at the limit.
    (q,) = predict(client, "good movie " * 200)
    same_answer(p, q)


SETTINGS: list[dict[str, Any]] = [
    {"threshold": t, "max_layers": m}
    for t, m in itertools.product([0.0, 0.5, 0.9, 1.0, None], [None, 1, 2, 3])
]


@pytest.mark.parametrize(
    "engine",
    [{"batching": "static"}, {"batching": "continuous"}, {"workers": 2, "threads": 2}],
    ids=["static", "continuous", "two-workers"],
)
def test_concurrent_requests_each_get_their_own_answer(
    make_app: Callable[..., FastAPI], model_info: dict[str, Any], engine: dict[str, Any]
) -> None:
    """200 requests at once, batched together, with mixed exit rules per request."""
    texts = random_texts(40, seed=11)
    jobs = [(texts[i % len(texts)], SETTINGS[(i * 7) % len(SETTINGS)]) for i in range(200)]

    def body(text: str, params: dict[str, Any]) -> dict[str, Any]:
        return {"inputs": text, "parameters": {k: v for k, v in params.items() if v is not None}}

    async def main() -> None:
        # No latency target: the test compares answers, and 200 requests at once on a busy
        # machine would otherwise be shed by expected wait or move the operating point.
        app = make_app(max_queue_delay_ms=5, latency_target_ms=0, **engine)
        async with async_client(app) as c:
            alone = [predictions(await c.post("/predict", json=body(t, p)))[0] for t, p in jobs]
            replies = await asyncio.gather(*(c.post("/predict", json=body(t, p)) for t, p in jobs))
            for (_, params), r, expected in zip(jobs, replies, alone, strict=True):
                (got,) = predictions(r)
                same_answer(got, expected)
                if params["max_layers"] is not None:
                    assert got["exit_layer"] <= params["max_layers"]
            assert {p["exit_layer"] for p in alone} == set(range(1, model_info["num_layers"] + 1))
            # The requests really shared batches: some layer step ran more than one row.
            m = metric_samples((await c.get("/metrics")).text)
            steps = sample(m, "exitserve_batch_size_count")
            assert sample(m, "exitserve_batch_size_bucket", le="1.0") < steps

    asyncio.run(main())


def answer(queue_s: float, inference_s: float, point: int | None) -> Answer:
    return Answer("positive", 0.9, 1, {}, queue_s, inference_s, point)


def test_timing_headers_carry_each_timing_under_its_own_name() -> None:
    h = timing_headers([answer(0.010, 0.200, 0), answer(0.030, 0.100, 2)], total_s=0.25)
    # The largest of each, in milliseconds: queue and inference are not interchangeable.
    assert (h["x-queue-time"], h["x-inference-time"], h["x-total-time"]) == (
        "30.000",
        "200.000",
        "250.000",
    )
    assert h["x-operating-point"] == "2"
    # A request that chose its own threshold names no point.
    assert "x-operating-point" not in timing_headers([answer(0.0, 0.0, None)], 0.0)


def test_answers_say_the_operating_point_unless_the_request_set_its_own_rule(
    client: TestClient,
) -> None:
    r = client.post("/predict", json={"inputs": "good"})
    assert r.headers["x-operating-point"] == "0"
    for params in ({"threshold": 0.5}, {"max_layers": 1}):
        r = client.post("/predict", json={"inputs": "good", "parameters": params})
        assert r.status_code == 200 and "x-operating-point" not in r.headers
