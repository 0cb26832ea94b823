"""Per-request deadlines: `parameters.timeout_ms` on both routes, capped by the server.

The engine's worker is held inside a batch (HeldEngine), so a request queued behind it
can only meet its deadline in the queue: it must come back 504 while the worker is
still held, and be counted as `exitserve_rejected_total{reason="deadline"}`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api.helpers import (
    GUARD_S,
    HeldEngine,
    Reply,
    assert_error,
    metric_samples,
    predict,
    sample,
)


def infer_body(texts: list[str], **parameters: Any) -> dict[str, Any]:
    return {
        "inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": texts}],
        "parameters": parameters,
    }


def deadline_rejections(client: TestClient) -> float:
    m = metric_samples(client.get("/metrics").text)
    return sample(m, "exitserve_rejected_total", reason="deadline")


@contextmanager
def busy_worker(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The worker held inside a batch for the duration.

    That batch's input goes to the engine directly, without a deadline: through the API
    it would get the server's own (30 ms in some tests here), which a busy machine can
    let pass before the worker takes it, and the worker would never be held.
    """
    held = HeldEngine(client, monkeypatch)
    engine = client.app.state.registry.engine()  # type: ignore[attr-defined]
    portal = client.portal  # type: ignore[attr-defined]
    first: Future[Any] = portal.start_task_soon(engine.submit, ["first"])
    try:
        assert held.entered.wait(GUARD_S), "the first input never reached the worker"
        yield
        assert not first.done(), "the worker was released too early"
    finally:
        held.release()
    assert len(first.result(timeout=GUARD_S)) == 1


def assert_deadline(r: Reply) -> None:
    body = assert_error(r, 504, "timeout")
    assert "deadline" in body["error"]


@pytest.mark.parametrize(
    ("route", "body"),
    [
        pytest.param(
            "/predict", {"inputs": ["a", "b"], "parameters": {"timeout_ms": 30}}, id="rest"
        ),
        pytest.param("/v2/models/tiny/infer", infer_body(["a", "b"], timeout_ms=30), id="v2"),
        # Triton's own request parameter, in microseconds (tritonclient's `timeout=`).
        pytest.param("/v2/models/tiny/infer", infer_body(["a"], timeout=30_000), id="v2-triton"),
    ],
)
def test_a_request_queued_past_its_deadline_is_504(
    serve: Callable[..., TestClient],
    monkeypatch: pytest.MonkeyPatch,
    route: str,
    body: dict[str, Any],
) -> None:
    client = serve()
    before = deadline_rejections(client)
    with busy_worker(client, monkeypatch):
        assert_deadline(client.post(route, json=body))
    assert deadline_rejections(client) == before + 1
    assert len(predict(client, ["a", "b"], timeout_ms=10_000)) == 2  # served once free


def test_the_server_maximum_caps_a_longer_timeout(
    serve: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    client = serve(max_timeout_ms=30, default_timeout_ms=30)
    with busy_worker(client, monkeypatch):
        # An hour asked for, 30 ms granted: the request is not left waiting on the worker.
        r = client.post("/predict", json={"inputs": "a", "parameters": {"timeout_ms": 3_600_000}})
        assert_deadline(r)


def test_requests_without_a_timeout_get_the_default(
    serve: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    client = serve(default_timeout_ms=30)
    with busy_worker(client, monkeypatch):
        assert_deadline(client.post("/predict", json={"inputs": "a"}))
        assert_deadline(client.post("/v2/models/tiny/infer", json=infer_body(["a"])))


def test_a_generous_deadline_changes_no_answer(client: TestClient) -> None:
    texts = ["a good film", "dull and slow", "fine"]
    assert predict(client, texts, timeout_ms=60_000) == predict(client, texts)


@pytest.mark.parametrize("value", [0, -5, 1.5, "soon", True])
def test_an_invalid_timeout_is_422(client: TestClient, value: Any) -> None:
    r = client.post("/predict", json={"inputs": "a", "parameters": {"timeout_ms": value}})
    assert_error(r, 422, "validation")
    assert "timeout_ms" in r.json()["error"]


@pytest.mark.parametrize(
    "parameters",
    [
        {"timeout_ms": 0},
        {"timeout_ms": "soon"},
        {"timeout": 0},
        {"timeout": 2.5},
        {"timeout": True},
    ],
)
def test_an_invalid_v2_timeout_is_422(client: TestClient, parameters: dict[str, Any]) -> None:
    r = client.post("/v2/models/tiny/infer", json=infer_body(["a"], **parameters))
    assert_error(r, 422, "validation")
    assert "timeout" in r.json()["error"]
