"""End to end: the real server process, on a free loopback port, with the default model."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.api.helpers import metric_samples, sample
from tests.server import server_process

ROOT = Path(__file__).parents[2]
MODEL = ROOT / "models" / "rt-sentiment-minilm"

Server = tuple[str, subprocess.Popen[bytes], Path]  # URL, process, its log

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (MODEL / "model.json").is_file(), reason="default model not built"),
]


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    settings = {"model_dir": str(MODEL), "threads": "1", "drain_timeout_s": "5"}
    log_path = tmp_path_factory.mktemp("e2e") / "server.log"
    with server_process(settings, log_path) as (url, proc):
        yield url, proc, log_path


def test_obvious_sentences_get_the_obvious_sentiment(
    server: Server,
) -> None:
    url, _, _ = server
    texts = [
        "a gripping, beautifully acted and deeply moving film.",
        "dull, lifeless and far too long; a complete waste of time.",
        "one of the best movies of the year, funny and warm.",
        "the plot is a mess and the acting is painfully bad.",
    ]
    r = httpx.post(f"{url}/predict", json={"inputs": texts}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "rt-sentiment-minilm"
    assert [p["label"] for p in body["predictions"]] == [
        "positive",
        "negative",
        "positive",
        "negative",
    ]
    assert all(1 <= p["exit_layer"] <= 6 and p["num_layers"] == 6 for p in body["predictions"])
    assert float(r.headers["x-total-time"]) > 0


def test_full_depth_on_request_and_metrics(server: Server) -> None:
    url, _, _ = server
    r = httpx.post(
        f"{url}/predict", json={"inputs": ["fine."], "parameters": {"threshold": 1.0}}, timeout=30
    )
    assert r.json()["predictions"][0]["exit_layer"] == 6
    info = httpx.get(f"{url}/info", timeout=10).json()
    assert info["dtype"] == "int8" and info["device"] == "cpu" and len(info["exit_thresholds"]) == 6
    m = metric_samples(httpx.get(f"{url}/metrics", timeout=10).text)
    model = "rt-sentiment-minilm"
    # The series exists from start-up: count the answer.
    assert sample(m, "exitserve_exits_total", exit_layer="6", model=model) >= 1
    info = {"model": model, "version": "1", "device": "cpu", "dtype": "int8"}
    assert m[("exitserve_model_info", frozenset(info.items()))] == 1


def test_sigterm_exits_cleanly(server: Server) -> None:
    _, proc, log_path = server
    proc.send_signal(signal.SIGTERM)
    # uvicorn shuts down gracefully, then re-raises the signal so the exit status says why.
    assert proc.wait(timeout=15) in (0, -signal.SIGTERM)
    log = log_path.read_text()
    assert "engines stopped (drained)" in log, log[-2000:]
