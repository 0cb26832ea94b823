"""Every refusal is JSON from one table, with the right status and no internals."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.config import Settings
from app.engine.adapt import CostModel
from tests.api.helpers import HeldEngine, assert_error, predict, sample, scrape, wait_until_idle

JSON = {"content-type": "application/json"}


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"inputs": ""}, id="empty-text"),
        pytest.param({"inputs": " \t\n "}, id="whitespace-text"),
        pytest.param({"inputs": ["fine", "   "]}, id="whitespace-text-in-list"),
        pytest.param({"inputs": []}, id="empty-list"),
        pytest.param({}, id="no-inputs"),
        pytest.param({"inputs": None}, id="null-inputs"),
        pytest.param({"inputs": 5}, id="number-inputs"),
        pytest.param({"inputs": [1, 2]}, id="list-of-numbers"),
        pytest.param({"inputs": {"text": "a"}}, id="object-inputs"),
        pytest.param({"inputs": [["a"]]}, id="nested-list"),
        pytest.param({"inputs": "a", "parameters": {"threshold": -0.1}}, id="threshold-below-0"),
        pytest.param({"inputs": "a", "parameters": {"threshold": 1.5}}, id="threshold-above-1"),
        pytest.param({"inputs": "a", "parameters": {"threshold": "high"}}, id="threshold-string"),
        pytest.param({"inputs": "a", "parameters": {"max_layers": 0}}, id="max-layers-0"),
        pytest.param({"inputs": "a", "parameters": {"max_layers": -1}}, id="max-layers-negative"),
        pytest.param({"inputs": "a", "parameters": {"max_layers": 2.5}}, id="max-layers-float"),
        pytest.param({"inputs": "a", "parameters": {"all_scores": "maybe"}}, id="all-scores-str"),
        pytest.param({"inputs": "a", "parameters": "fast"}, id="parameters-string"),
        pytest.param({"inputs": "a", "extra": 1}, id="unknown-field"),
        pytest.param({"inputs": "a", "parameters": {"temperature": 1}}, id="unknown-parameter"),
    ],
)
def test_invalid_request_is_422(client: TestClient, body: dict[str, Any]) -> None:
    assert_error(client.post("/predict", json=body), 422, "validation")


def test_max_layers_past_the_last_exit_is_422(
    client: TestClient, model_info: dict[str, Any]
) -> None:
    L = model_info["num_layers"]
    body = assert_error(
        client.post("/predict", json={"inputs": "a", "parameters": {"max_layers": L + 1}}), 422
    )
    assert "max_layers" in body["error"]
    assert predict(client, "a", max_layers=L)[0]["exit_layer"] <= L


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b'{"inputs":"a","parameters":{"threshold":NaN}}', id="threshold-nan"),
        pytest.param(b'{"inputs":"a","parameters":{"threshold":Infinity}}', id="threshold-inf"),
        pytest.param(b'{"inputs": "a"', id="truncated-json"),
        pytest.param(b"inputs=a", id="not-json"),
        pytest.param(b"", id="empty-body"),
    ],
)
def test_malformed_body_is_422(client: TestClient, raw: bytes) -> None:
    assert_error(client.post("/predict", content=raw, headers=JSON), 422, "validation")


# JSON that json.loads fails on with something other than JSONDecodeError.
UNDECODABLE = [
    pytest.param(b'{"inputs": "caf\xe9 \xff"}', id="invalid-utf8"),
    pytest.param(b"[" * 100_000, id="nested-past-the-recursion-limit"),
]


@pytest.mark.parametrize("raw", UNDECODABLE)
def test_undecodable_body_is_422(client: TestClient, raw: bytes) -> None:
    assert_error(client.post("/predict", content=raw, headers=JSON), 422, "validation")


@pytest.mark.parametrize("raw", UNDECODABLE)
def test_undecodable_body_is_a_client_error_that_leaks_nothing(
    client: TestClient, raw: bytes
) -> None:
    r = client.post("/predict", content=raw, headers=JSON)
    assert 400 <= r.status_code < 500
    assert_error(r, r.status_code)


LONE_SURROGATE = b'{"inputs": ["good", "bad \\ud800 text"]}'  # valid JSON, not valid Unicode


def test_lone_surrogate_is_422(client: TestClient) -> None:
    assert_error(client.post("/predict", content=LONE_SURROGATE, headers=JSON), 422)


def test_internal_error_leaks_nothing(client: TestClient) -> None:
    # Today a lone surrogate reaches the worker and fails there: the 500 that comes
    # back must still be the plain error shape.
    r = client.post("/predict", content=LONE_SURROGATE, headers=JSON)
    assert r.status_code in (422, 500)
    assert_error(r, r.status_code)
    assert len(predict(client, "good")) == 1  # the engine survives a failed batch


def test_engine_answers_a_batch_holding_an_unencodable_text(client: TestClient) -> None:
    # The API refuses lone surrogates (422); callers of the engine itself must not be
    # able to fail a whole batch with one either.
    engine = client.app.state.registry.engine()  # type: ignore[attr-defined]
    portal = client.portal  # type: ignore[attr-defined]
    answers = portal.call(engine.submit, ["good", "bad \ud800 text"])
    assert [a.label in engine.runtime.labels for a in answers] == [True, True]


def test_unknown_route_is_404_json(client: TestClient) -> None:
    assert_error(client.get("/no/such/route"), 404, "not_found")


def test_wrong_method_is_405_json(client: TestClient) -> None:
    r = client.get("/predict")
    assert_error(r, 405, "method_not_allowed")
    assert "POST" in r.headers["allow"]


def test_too_many_inputs_is_413(serve: Callable[..., TestClient]) -> None:
    client = serve(max_inputs_per_request=3)
    assert len(predict(client, ["a", "b", "c"])) == 3
    body = assert_error(client.post("/predict", json={"inputs": ["a"] * 4}), 413, "too_large")
    assert "3" in body["error"]


def test_body_over_limit_is_413(serve: Callable[..., TestClient]) -> None:
    client = serve(max_body_bytes=1024)
    assert len(predict(client, "x" * 900)) == 1  # under the limit: served
    r = client.post("/predict", json={"inputs": "x" * 2000})
    assert "content-length" in r.request.headers
    assert_error(r, 413, "too_large")


def _chunks(total: int, size: int = 256) -> Iterator[bytes]:
    yield b'{"inputs": "'
    for _ in range(total // size):
        yield b"x" * size
    yield b'"}'


def test_streamed_body_over_limit_is_413_on_v2(serve: Callable[..., TestClient]) -> None:
    client = serve(max_body_bytes=1024)
    r = client.post("/v2/models/tiny/infer", content=_chunks(4096), headers=JSON)
    assert "content-length" not in r.request.headers  # chunked: only counting can catch it
    assert_error(r, 413, "too_large")


def test_streamed_body_over_limit_is_413_on_predict(serve: Callable[..., TestClient]) -> None:
    client = serve(max_body_bytes=1024)
    r = client.post("/predict", content=_chunks(4096), headers=JSON)
    assert "content-length" not in r.request.headers
    assert_error(r, 413, "too_large")


def test_long_text_is_served(client: TestClient) -> None:
    assert len(predict(client, "a " * 25_000)) == 1  # 50,000 characters


@pytest.mark.parametrize("status", [429, 503])
def test_overload_is_refused_at_once_with_retry_after(
    serve: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch, status: int
) -> None:
    client = serve(max_queue_size=2, max_inputs_per_request=2, overload_status=status)
    held = HeldEngine(client, monkeypatch)
    with ThreadPoolExecutor(1) as pool:
        try:
            first = pool.submit(client.post, "/predict", json={"inputs": "good"})
            assert held.entered.wait(10), "the first request never reached the worker"
            # One input in flight + two more > a queue of two: refused without waiting.
            r = client.post("/predict", json={"inputs": ["a", "b"]})
            assert_error(r, status, "overloaded")
            assert r.headers["retry-after"] == "1"
            # The v2 route goes through the same admission.
            r = client.post(
                "/v2/models/tiny/infer",
                json={
                    "inputs": [
                        {"name": "text", "shape": [2], "datatype": "BYTES", "data": ["a", "b"]}
                    ]
                },
            )
            assert_error(r, status, "overloaded")
            assert r.headers["retry-after"] == "1"
        finally:
            held.release()
        assert first.result(timeout=10).status_code == 200
    wait_until_idle(client)  # the answered input is in flight until its batch ends
    assert len(predict(client, ["a", "b"])) == 2  # recovered


def test_a_full_queue_sheds_before_the_body_is_read(
    serve: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no room left, an inference request is refused without parsing its body (even
    an invalid one gets the overload answer), while keys are still checked first."""
    client = serve(max_queue_size=1, max_inputs_per_request=1, api_keys="k1")
    auth = {"authorization": "Bearer k1"}
    held = HeldEngine(client, monkeypatch)
    with ThreadPoolExecutor(1) as pool:
        try:
            first = pool.submit(client.post, "/predict", json={"inputs": "good"}, headers=auth)
            assert held.entered.wait(10), "the first request never reached the worker"
            for path in ("/predict", "/v2/models/tiny/infer"):
                r = client.post(path, content=b"{not json", headers={**auth, **JSON})
                assert_error(r, 429, "overloaded")
                assert r.headers["retry-after"] == "1"
                # No key, or a wrong one: 401 as always, never a hint of load.
                assert_error(client.post(path, content=b"{}", headers=JSON), 401)
            # Not an inference route: served as usual.
            assert client.get("/readyz").status_code == 200
        finally:
            held.release()
        assert first.result(timeout=10).status_code == 200
    wait_until_idle(client)  # the answered input is in flight until its batch ends
    m = scrape(client)
    assert sample(m, "exitserve_rejected_total", reason="overloaded") == 2
    assert sample(m, "exitserve_requests_total", endpoint="predict", status="429") == 1
    assert sample(m, "exitserve_requests_total", endpoint="v2_infer", status="429") == 1
    # With room again, the same invalid body gets its validation error.
    assert_error(client.post("/predict", content=b"{not json", headers={**auth, **JSON}), 422)


def test_api_keys(serve: Callable[..., TestClient]) -> None:
    client = serve(api_keys="k1,k2")
    infer = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]}]}
    for auth in (None, "Bearer nope", "Bearer ", "k2", "Basic k2", "Bearer k1,k2"):
        headers: dict[str, str] = {} if auth is None else {"authorization": auth}
        r = client.post("/predict", json={"inputs": "a"}, headers=headers)
        assert_error(r, 401, "unauthorized")
        assert r.headers["www-authenticate"] == "Bearer"
        assert_error(client.post("/v2/models/tiny/infer", json=infer, headers=headers), 401)
    for key in ("k1", "k2"):
        headers = {"authorization": f"Bearer {key}"}
        assert client.post("/predict", json={"inputs": "a"}, headers=headers).status_code == 200
        assert client.post("/v2/models/tiny/infer", json=infer, headers=headers).status_code == 200
    for path in ("/healthz", "/readyz", "/metrics"):
        assert client.get(path).status_code == 200, path


def test_settings_refuse_a_request_larger_than_the_queue(
    make_settings: Callable[..., Settings],
) -> None:
    with pytest.raises(ValidationError, match="max_inputs_per_request"):
        make_settings(max_inputs_per_request=300, max_queue_size=256)
    assert make_settings(max_inputs_per_request=256, max_queue_size=256).max_queue_size == 256


@pytest.mark.parametrize(
    "bad",
    [
        {"quantization": "int4"},
        {"device": "tpu"},
        {"overload_status": 500},
        {"threads": 0},
        {"max_body_bytes": 10},
        {"workers": 3, "threads": 2},
        {"workers": 2, "threads": 2, "batching": "continuous"},
        {"batching": "dynamic"},
        {"default_timeout_ms": 60_001, "max_timeout_ms": 60_000},
        {"max_timeout_ms": 0},
        {"stuck_after_s": 0},
    ],
)
def test_settings_refuse_nonsense(
    make_settings: Callable[..., Settings], bad: dict[str, Any]
) -> None:
    with pytest.raises(ValidationError):
        make_settings(**bad)


def test_a_request_expected_to_miss_its_budget_is_refused_with_a_computed_retry_after(
    serve: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Batches of one input, so that the one held below is a full batch ahead.
    client = serve(latency_target_ms=50, max_batch_size=1)
    c = client.app.state.registry.engine().controller  # type: ignore[attr-defined]
    c.costs = CostModel()
    c.costs.observe(1.0, 2.0)  # as if the engine were measured at 2 s per layer unit
    wait = c.expected_latency(2, c.shallowest)  # one input ahead, one new
    assert wait > 1.0
    held = HeldEngine(client, monkeypatch)
    engine = client.app.state.registry.engine()  # type: ignore[attr-defined]
    with ThreadPoolExecutor(2) as pool:
        try:
            # With nothing ahead a request is admitted whatever the estimate: no wait.
            first = pool.submit(client.post, "/predict", json={"inputs": "good"})
            assert held.entered.wait(10), "the first request never reached the worker"
            for path, body in (
                ("/predict", {"inputs": "good"}),
                ("/v2/models/tiny/infer", oip_body("good")),
            ):
                r = client.post(path, json=body)
                assert_error(r, 429, "overloaded")
                assert r.headers["retry-after"] == str(math.ceil(wait - c.admit_at * 0.05))
            # With a deadline of its own, the request is judged against it (in the
            # route, after parsing; the shedding above only knows the target).
            r = client.post("/predict", json={"inputs": "good", "parameters": {"timeout_ms": 500}})
            assert_error(r, 429, "overloaded")
            assert r.headers["retry-after"] == str(math.ceil(wait - c.admit_at * 0.5))
            # A request that grants itself a longer deadline than the wait is admitted.
            enough = math.ceil(1000 * wait / c.admit_at) + 1000
            assert enough <= 60_000  # within MAX_TIMEOUT_MS
            later = pool.submit(
                client.post,
                "/predict",
                json={"inputs": "good", "parameters": {"timeout_ms": enough}},
            )
            stop = time.monotonic() + 10
            while engine.queued() != 1:  # admitted, behind the held input
                assert time.monotonic() < stop, "the request with a long deadline was refused"
                time.sleep(0.005)
        finally:
            held.release()
        assert first.result(timeout=10).status_code == 200
        assert later.result(timeout=10).status_code == 200
    m = scrape(client)
    assert sample(m, "exitserve_rejected_total", reason="expected_wait") == 3
    assert sample(m, "exitserve_rejected_total", reason="overloaded") == 0


def oip_body(text: str) -> dict[str, Any]:
    return {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [text]}]}
