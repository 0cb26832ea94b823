"""Adapt to load, over HTTP: a real server on the default model, a real burst.

The latency target is set far below what a burst of many concurrent requests can get,
so the controller must leave the calibrated point, answers must say so, refusals must
carry Retry-After, and once the burst is over the point must come back to 0 on its own.
No wall-clock bound is asserted: waits are guarded polls.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.api.helpers import metric_samples, sample
from tests.server import ROOT, server_process
from tests.tiny import random_texts

pytestmark = pytest.mark.slow

MODEL = ROOT / "models" / "rt-sentiment-minilm"
GUARD_S = 60.0  # only reached when the test fails


def metric(url: str, name: str) -> float:
    """The metric's value, summed over its series (one per model: one here)."""
    samples = metric_samples(httpx.get(f"{url}/metrics", timeout=10).text)
    assert any(n == name for n, _ in samples), f"{name} missing from /metrics"
    return sample(samples, name)


def test_a_burst_moves_the_operating_point_down_and_it_comes_back(tmp_path: Path) -> None:
    settings = {
        "model_dir": str(MODEL),
        "device": "cpu",
        "threads": "2",
        "latency_target_ms": "100",
        "max_accuracy_drop": "0.05",
    }
    texts = random_texts(64, seed=3, min_words=8, max_words=30)
    with server_process(settings, tmp_path / "server.log") as (url, _):
        info = httpx.get(f"{url}/info", timeout=10).json()["adaptation"]
        assert info["admission"] and info["moves"] and info["floor"] > 0
        assert info["point"] == 0
        assert len(info["ladder"]) > info["floor"]

        stop = time.monotonic() + 4.0
        seen_points: list[float] = []

        def client(i: int) -> list[httpx.Response]:
            out = []
            with httpx.Client(timeout=30) as c:
                k = i
                while time.monotonic() < stop:
                    batch = [texts[(k + j) % len(texts)] for j in range(8)]
                    out.append(c.post(f"{url}/predict", json={"inputs": batch}))
                    k += 8
            return out

        with ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(client, i) for i in range(16)]
            while time.monotonic() < stop:
                seen_points.append(metric(url, "exitserve_operating_point"))
                time.sleep(0.2)
            replies = [r for f in futures for r in f.result()]

        statuses = {r.status_code for r in replies}
        assert statuses <= {200, 429}, statuses
        ok = [r for r in replies if r.status_code == 200]
        refused = [r for r in replies if r.status_code == 429]
        assert ok, "the burst got no answer at all"
        assert all(int(r.headers["retry-after"]) >= 1 for r in refused)
        served_at = {int(r.headers["x-operating-point"]) for r in ok}
        assert max(served_at) > 0, "no answer was served below the calibrated point"
        assert max(served_at) <= info["floor"]
        assert max(seen_points) > 0

        # The burst is over: the controller climbs back with no traffic at all.
        deadline = time.monotonic() + GUARD_S
        while metric(url, "exitserve_operating_point") != 0:
            assert time.monotonic() < deadline, "the operating point never came back to 0"
            time.sleep(0.2)
        assert metric(url, "exitserve_degraded_seconds_total") > 0
        r = httpx.post(f"{url}/predict", json={"inputs": texts[0]}, timeout=30)
        assert r.status_code == 200 and r.headers["x-operating-point"] == "0"
        # A request with its own threshold keeps it and names no point.
        r = httpx.post(
            f"{url}/predict", json={"inputs": texts[0], "parameters": {"threshold": 1.0}}
        )
        assert r.status_code == 200 and "x-operating-point" not in r.headers
        assert r.json()["predictions"][0]["exit_layer"] == 6
