"""Health, readiness, /info, and what /metrics says about the traffic served."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.network.quantize import INT8_SCHEME, int8_kernel
from tests.api.helpers import (
    HeldEngine,
    assert_error,
    metric_samples,
    predict,
    sample,
    scrape,
    wait_until_idle,
)
from tests.tiny import random_texts

# DESIGN.md's metrics table: name -> Prometheus type.
METRICS = {
    "exitserve_requests": "counter",
    "exitserve_request_duration_seconds": "histogram",
    "exitserve_queue_duration_seconds": "histogram",
    "exitserve_inference_duration_seconds": "histogram",
    "exitserve_exit_layer": "histogram",
    "exitserve_exits": "counter",
    "exitserve_layers_executed": "counter",
    "exitserve_layers_skipped": "counter",
    "exitserve_batch_size": "histogram",
    "exitserve_queue_size": "gauge",
    "exitserve_inflight_inputs": "gauge",
    "exitserve_rejected": "counter",
    "exitserve_model_info": "gauge",
    "exitserve_ready": "gauge",
    "exitserve_operating_point": "gauge",
    "exitserve_expected_accuracy": "gauge",
    "exitserve_expected_wait_seconds": "gauge",
    "exitserve_degraded_seconds": "counter",
}


def test_healthz(client: TestClient) -> None:
    r = client.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}


def test_readyz_when_running(client: TestClient) -> None:
    r = client.get("/readyz")
    assert r.status_code == 200
    assert r.json() == {"status": "ready"}


def test_draining_refuses_work(serve: Callable[..., TestClient]) -> None:
    client = serve()
    assert client.get("/readyz").status_code == 200
    assert sample(scrape(client), "exitserve_ready") == 1
    client.app.state.registry.engine().begin_drain()  # type: ignore[attr-defined]
    assert_error(client.get("/readyz"), 503, "unavailable")
    assert sample(scrape(client), "exitserve_ready") == 0
    r = client.post("/predict", json={"inputs": "good"})
    assert_error(r, 503, "unavailable")
    assert r.headers["retry-after"] == "1"
    assert client.get("/v2/health/ready").status_code == 503
    assert client.get("/healthz").status_code == 200  # alive while draining


def test_info(client: TestClient) -> None:
    info = client.get("/info").json()
    assert info["model"] == "tiny"
    assert info["model_version"] == "1"
    assert info["labels"] == ["negative", "positive"]
    assert info["num_layers"] == 4
    assert len(info["exit_thresholds"]) == info["num_layers"]
    assert all(0.0 <= t <= 1.0 for t in info["exit_thresholds"])
    assert info["confidence"] == "max_softmax"
    assert info["device"] == "cpu"
    assert info["dtype"] == "int8"
    # The stated contract (README "Same text, same answer").
    assert info["batch_invariant"] is True
    assert info["scheme"] == INT8_SCHEME
    assert info["kernel"] == int8_kernel()  # onnxruntime: a runtime dependency
    assert info["threads"] == 1
    assert info["workers"] == 1
    assert info["max_batch_size"] == 32
    assert info["max_queue_delay_ms"] == pytest.approx(1.0)
    assert info["max_queue_size"] == 256
    assert info["max_inputs_per_request"] == 64
    assert info["max_seq_len"] == 32
    assert isinstance(info["calibration"], dict)
    assert isinstance(info["version"], str)


def test_metrics_has_every_metric_of_the_design(client: TestClient) -> None:
    predict(client, "good")
    r = client.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    types = {f.name: f.type for f in text_string_to_metric_families(r.text)}
    for name, kind in METRICS.items():
        assert types.get(name) == kind, (name, types.get(name))
    m = metric_samples(r.text)
    assert (
        sample(m, "exitserve_model_info", model="tiny", version="1", device="cpu", dtype="int8")
        == 1
    )
    tiny = ("model", "tiny")
    for k in range(1, 5):  # every exit is listed before it is used
        assert ("exitserve_exits_total", frozenset({("exit_layer", str(k)), tiny})) in m
    for reason in ("overloaded", "too_large", "draining", "deadline"):
        assert ("exitserve_rejected_total", frozenset({("reason", reason), tiny})) in m
    # Every series about a model names it; request counts name the model they asked.
    for (name, labels), _ in m.items():
        if name.startswith("exitserve_") and not name.startswith("exitserve_request"):
            assert dict(labels).get("model") == "tiny" or name.startswith(
                "exitserve_rejected_total"
            ), name
    assert sample(m, "exitserve_requests_total", endpoint="predict", model="tiny") == 1


@pytest.mark.parametrize(("threshold", "exit_at"), [(0.0, 1), (1.0, 4)])
def test_metrics_count_exactly_what_was_served(
    serve: Callable[..., TestClient], threshold: float, exit_at: int
) -> None:
    client = serve()
    L, n = 4, 10
    texts = random_texts(n, seed=5)
    before = scrape(client)
    # Four requests: three single texts, then a list of the other seven.
    for t in texts[:3]:
        assert predict(client, t, threshold=threshold)[0]["exit_layer"] == exit_at
    assert {p["exit_layer"] for p in predict(client, texts[3:], threshold=threshold)} == {exit_at}
    wait_until_idle(client)  # the worker counts an answer after it has sent it
    after = scrape(client)

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    for k in range(1, L + 1):
        assert delta("exitserve_exits_total", exit_layer=str(k)) == (n if k == exit_at else 0)
    assert delta("exitserve_layers_executed_total") == n * exit_at
    assert delta("exitserve_layers_skipped_total") == n * (L - exit_at)
    assert delta("exitserve_exit_layer_count") == n
    assert delta("exitserve_exit_layer_sum") == n * exit_at
    for k in range(1, L + 1):  # cumulative buckets
        assert delta("exitserve_exit_layer_bucket", le=f"{k}.0") == (n if k >= exit_at else 0)
    assert delta("exitserve_queue_duration_seconds_count") == n
    assert delta("exitserve_inference_duration_seconds_count") == n
    assert delta("exitserve_requests_total", endpoint="predict", status="200") == 4
    assert delta("exitserve_request_duration_seconds_count", endpoint="predict") == 4
    # Rows per layer step, summed over steps, is the layers executed.
    assert delta("exitserve_batch_size_sum") == n * exit_at


def test_metrics_count_errors_by_status(serve: Callable[..., TestClient]) -> None:
    client = serve()
    before = scrape(client)
    client.post("/predict", json={"inputs": ""})
    client.post("/predict", json={"inputs": ""})
    client.get("/nope")
    after = scrape(client)
    d = sample(after, "exitserve_requests_total", endpoint="predict", status="422") - sample(
        before, "exitserve_requests_total", endpoint="predict", status="422"
    )
    assert d == 2
    assert sample(after, "exitserve_requests_total", endpoint="other", status="404") >= 1
    assert sample(after, "exitserve_exit_layer_count") == sample(
        before, "exitserve_exit_layer_count"
    )


def test_rejected_counts_body_too_large(serve: Callable[..., TestClient]) -> None:
    client = serve(max_body_bytes=1024)
    assert_error(client.post("/predict", json={"inputs": "x" * 2000}), 413)
    assert sample(scrape(client), "exitserve_rejected_total", reason="too_large") == 1


def test_rejected_counts_too_many_inputs(serve: Callable[..., TestClient]) -> None:
    client = serve(max_inputs_per_request=2)
    assert_error(client.post("/predict", json={"inputs": ["a", "b", "c"]}), 413)
    assert sample(scrape(client), "exitserve_rejected_total", reason="too_large") == 1


def test_rejected_counts_draining(serve: Callable[..., TestClient]) -> None:
    client = serve()
    client.app.state.registry.engine().begin_drain()  # type: ignore[attr-defined]
    assert_error(client.post("/predict", json={"inputs": "a"}), 503)
    assert sample(scrape(client), "exitserve_rejected_total", reason="draining") == 1


def test_rejected_counts_overload(
    serve: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    client = serve(max_queue_size=1, max_inputs_per_request=1)
    held = HeldEngine(client, monkeypatch)
    with ThreadPoolExecutor(1) as pool:
        try:
            first = pool.submit(client.post, "/predict", json={"inputs": "good"})
            assert held.entered.wait(10)
            assert_error(client.post("/predict", json={"inputs": "a"}), 429, "overloaded")
        finally:
            held.release()
        assert first.result(timeout=10).status_code == 200
    m = scrape(client)
    assert sample(m, "exitserve_requests_total", endpoint="predict", status="429") == 1
    assert sample(m, "exitserve_rejected_total", reason="overloaded") == 1


def test_promtool_accepts_the_metrics(serve: Callable[..., TestClient]) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is not installed (apt-get install prometheus)")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    client = serve(max_body_bytes=1024)
    predict(client, random_texts(5, seed=1))
    predict(client, "good", threshold=1.0)
    client.post("/predict", json={"inputs": ""})
    client.post("/predict", json={"inputs": "x" * 2000})
    client.post(
        "/v2/models/tiny/infer",
        json={"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]}]},
    )
    text = client.get("/metrics").text
    p = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.strip() == "" and p.stderr.strip() == "", p.stdout + p.stderr


def test_info_and_metrics_show_the_load_controller(serve: Callable[..., TestClient]) -> None:
    client = serve(latency_target_ms=250, max_accuracy_drop=0.02)
    a = client.get("/info").json()["adaptation"]
    # The tiny model was calibrated without a ladder: one point, nothing to move along,
    # but admission by expected wait still applies.
    assert (a["latency_target_ms"], a["max_accuracy_drop"]) == (250, 0.02)
    assert (a["admission"], a["moves"], a["floor"], a["point"]) == (True, False, 0, 0)
    [point] = a["ladder"]
    assert point["thresholds"] == client.get("/info").json()["exit_thresholds"]
    m = scrape(client)
    assert sample(m, "exitserve_operating_point") == 0
    assert sample(m, "exitserve_expected_accuracy") == point["accuracy"]
    assert sample(m, "exitserve_degraded_seconds_total") == 0
    assert sample(m, "exitserve_rejected_total", reason="expected_wait") == 0
    off = serve(latency_target_ms=0).get("/info").json()["adaptation"]
    assert (off["admission"], off["moves"]) == (False, False)
