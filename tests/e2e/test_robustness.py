"""End to end on the real server process with a tiny model: graceful drain on SIGTERM,
and a tampered model file that stops start-up."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.api.helpers import assert_error, metric_samples
from tests.server import ROOT, free_port, server_process
from tests.tiny import random_texts

pytestmark = pytest.mark.slow

DRAIN_TIMEOUT_S = 20
GUARD_S = 60.0  # only ever reached when a test fails
REQUESTS, PER_REQUEST = 12, 64


def backlog(url: str) -> tuple[float, float]:
    """(inputs admitted so far, inputs queued now), from the server's own metrics."""
    m = metric_samples(httpx.get(f"{url}/metrics", timeout=10).text)
    queued = sum(v for (name, _), v in m.items() if name == "exitserve_queue_size")
    inflight = sum(v for (name, _), v in m.items() if name == "exitserve_inflight_inputs")
    answered = sum(v for (name, _), v in m.items() if name == "exitserve_exits_total")
    return queued + inflight + answered, queued


@pytest.mark.parametrize("entry", ["cli", "uvicorn"])
def test_sigterm_drains_every_accepted_request_then_exits_0(
    tiny_model_dir: Path, tmp_path: Path, entry: str
) -> None:
    """`exitserve serve` drains before it stops listening; plain `uvicorn app.main:app`
    stops listening at once, finishes the responses in flight, and the lifespan's
    `Engine.stop` drains whatever is still queued: either way, every admitted input is
    answered."""
    settings = {
        "model_dir": str(tiny_model_dir),
        "device": "cpu",
        "quantization": "none",
        "threads": "1",
        # One input per batch at full depth: the backlog below takes a while to run.
        "max_batch_size": "1",
        "max_queue_size": str(REQUESTS * PER_REQUEST),
        "drain_timeout_s": str(DRAIN_TIMEOUT_S),
        "log_level": "info",
        # The backlog is the point here: no refusal by expected wait.
        "latency_target_ms": "0",
    }
    texts = random_texts(PER_REQUEST, seed=3, min_words=20, max_words=30)
    body = {"inputs": texts, "parameters": {"threshold": 1.0}}
    log_path = tmp_path / "server.log"
    with (
        server_process(settings, log_path, entry) as (url, proc),
        ThreadPoolExecutor(REQUESTS) as pool,
    ):
        accepted = [
            pool.submit(httpx.post, f"{url}/predict", json=body, timeout=GUARD_S)
            for _ in range(REQUESTS)
        ]
        stop = time.monotonic() + GUARD_S
        while True:  # every request admitted, and plenty still queued
            admitted, queued = backlog(url)
            if admitted == REQUESTS * PER_REQUEST:
                break
            assert time.monotonic() < stop, "the requests were never all admitted"
            time.sleep(0.005)
        assert queued > PER_REQUEST, "the backlog ran out before the signal: nothing to drain"

        proc.send_signal(signal.SIGTERM)
        if entry == "cli":  # still listening: it says it drains
            r = httpx.get(f"{url}/readyz", timeout=10)
            assert_error(r, 503, "unavailable")
            assert r.json()["error"] == "draining"
            r = httpx.post(f"{url}/predict", json={"inputs": "new work"}, timeout=10)
            assert_error(r, 503, "unavailable")
            assert r.headers["retry-after"] == "1"
            assert httpx.get(f"{url}/v2/health/ready", timeout=10).status_code == 503

        for f in accepted:
            r = f.result(timeout=GUARD_S)
            assert r.status_code == 200, r.text
            assert [p["exit_layer"] for p in r.json()["predictions"]] == [4] * PER_REQUEST
        # uvicorn re-raises the signal it caught once it has shut down cleanly.
        clean = 0 if entry == "cli" else -signal.SIGTERM
        assert proc.wait(timeout=DRAIN_TIMEOUT_S) == clean
    log = log_path.read_text()
    assert "Traceback" not in log, log[-2000:]
    if entry == "cli":
        assert "engines stopped (drained)" in log, log[-2000:]
        assert "POST /predict" not in log  # no access log unless asked for


def test_sigterm_when_idle_exits_0(tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = {
        "model_dir": str(tiny_model_dir),
        "quantization": "none",
        "threads": "1",
        "access_log": "true",
    }
    with server_process(settings, tmp_path / "server.log") as (url, proc):
        assert httpx.post(f"{url}/predict", json={"inputs": "fine"}, timeout=10).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=DRAIN_TIMEOUT_S) == 0
    assert '"POST /predict HTTP/1.1" 200' in (tmp_path / "server.log").read_text()


def test_a_tampered_model_file_stops_start_up_and_never_turns_ready(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "tiny"))
    weights = model / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXITSERVE_")}
    env.update(
        EXITSERVE_MODEL_DIR=str(model),
        EXITSERVE_HOST="127.0.0.1",
        EXITSERVE_PORT=str(port),
        EXITSERVE_QUANTIZATION="none",
        EXITSERVE_THREADS="1",
    )
    stderr_path = tmp_path / "stderr"
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        stop = time.monotonic() + GUARD_S
        while proc.poll() is None:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1)
                assert r.status_code != 200, "a tampered model turned ready"
            except httpx.TransportError:
                pass
            assert time.monotonic() < stop, "the server neither failed nor exited"
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    stderr = stderr_path.read_text()
    assert proc.returncode != 0
    assert "sha256 mismatch for model file weights.safetensors" in stderr, stderr[-2000:]
