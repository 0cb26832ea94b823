"""End to end: the real server process, on a free loopback port, with the default model."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).parents[2]
MODEL = ROOT / "models" / "rt-sentiment-minilm"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (MODEL / "model.json").is_file(), reason="default model not built"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXITSERVE_")}
    env.update(
        EXITSERVE_MODEL_DIR=str(MODEL),
        EXITSERVE_HOST="127.0.0.1",
        EXITSERVE_PORT=str(port),
        EXITSERVE_THREADS="1",
        EXITSERVE_DRAIN_TIMEOUT_S="5",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                out = proc.stdout.read().decode() if proc.stdout else ""
                pytest.fail(f"server exited early:\n{out[-2000:]}")
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        else:
            pytest.fail("server did not become ready")
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_obvious_sentences_get_the_obvious_sentiment(
    server: tuple[str, subprocess.Popen[bytes]],
) -> None:
    url, _ = server
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


def test_full_depth_on_request_and_metrics(server: tuple[str, subprocess.Popen[bytes]]) -> None:
    url, _ = server
    r = httpx.post(
        f"{url}/predict", json={"inputs": ["fine."], "parameters": {"threshold": 1.0}}, timeout=30
    )
    assert r.json()["predictions"][0]["exit_layer"] == 6
    info = httpx.get(f"{url}/info", timeout=10).json()
    assert info["dtype"] == "int8" and info["device"] == "cpu" and len(info["exit_thresholds"]) == 6
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    assert 'exitserve_exits_total{exit_layer="6"}' in metrics
    info_line = (
        'exitserve_model_info{device="cpu",dtype="int8",model="rt-sentiment-minilm",version="1"}'
    )
    assert f"{info_line} 1.0" in metrics


def test_sigterm_exits_cleanly(server: tuple[str, subprocess.Popen[bytes]]) -> None:
    _, proc = server
    proc.send_signal(signal.SIGTERM)
    # uvicorn shuts down gracefully, then re-raises the signal so the exit status says why.
    assert proc.wait(timeout=15) in (0, -signal.SIGTERM)
    log = proc.stdout.read().decode() if proc.stdout else ""
    assert "engine stopped (drained)" in log, log[-2000:]
