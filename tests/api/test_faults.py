"""Faults through the API: a failing batch, a stuck engine, a dead worker, a bad model file."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.main import create_app
from app.network.backends import RunningBatch
from tests.api.conftest import build_settings
from tests.api.helpers import HeldEngine, assert_error, predict, sample, scrape, wait_until_idle

POISON = "rotten"  # a vocabulary word: any batch holding it fails inside the network


def poison_network(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = client.app.state.registry.engine().runtime  # type: ignore[attr-defined]
    [poison_id] = [i for i in runtime.tokenizer.encode([POISON])[0] if i > 3]
    begin = runtime.backend.begin

    def failing(token_ids: Sequence[Sequence[int]]) -> RunningBatch:
        if any(poison_id in row for row in token_ids):
            raise RuntimeError(f"{Path(__file__).resolve()}: CUDA error: device-side assert")
        return begin(token_ids)

    run_alone = runtime.backend.run_alone

    def failing_alone(token_ids: Sequence[int], *rule: object) -> torch.Tensor | None:
        if poison_id in token_ids:  # a row alone runs in one call, without `begin`
            raise RuntimeError(f"{Path(__file__).resolve()}: CUDA error: device-side assert")
        return run_alone(token_ids, *rule)

    monkeypatch.setattr(runtime.backend, "begin", failing)
    monkeypatch.setattr(runtime.backend, "run_alone", failing_alone)


def test_a_failing_batch_is_500_without_internals_and_the_engine_serves_on(
    serve: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    client = serve()
    poison_network(client, monkeypatch)
    for _ in range(2):  # the engine survives more than one failure
        body = assert_error(client.post("/predict", json={"inputs": f"a {POISON} film"}), 500)
        assert body == {"error": "internal error", "error_type": "internal"}
        infer = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [POISON]}]}
        assert_error(client.post("/v2/models/tiny/infer", json=infer), 500, "internal")
        assert len(predict(client, ["a good film", "dull"])) == 2
    assert client.get("/readyz").status_code == 200


def test_a_stuck_engine_fails_readiness_until_its_batch_ends(
    serve: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    client = serve(stuck_after_s=0.05)
    held = HeldEngine(client, monkeypatch)
    with ThreadPoolExecutor(1) as pool:
        try:
            first = pool.submit(client.post, "/predict", json={"inputs": "held"})
            assert held.entered.wait(10)
            r = client.get("/readyz")
            for _ in range(1000):  # polls until the batch has run past stuck_after_s
                if r.status_code == 503:
                    break
                r = client.get("/readyz")
            assert_error(r, 503, "unavailable")
            assert r.json()["error"] == "stuck"
            assert sample(scrape(client), "exitserve_ready") == 0
            assert client.get("/v2/health/ready").status_code == 503
            assert client.get("/healthz").status_code == 200  # stuck is not dead
        finally:
            held.release()
        assert first.result(timeout=10).status_code == 200
    wait_until_idle(client)  # the batch counts as running until its worker is done
    assert client.get("/readyz").status_code == 200
    assert sample(scrape(client), "exitserve_ready") == 1


def test_a_dead_worker_fails_liveness_and_readiness(
    serve: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    client = serve()
    engine = client.app.state.registry.engine()  # type: ignore[attr-defined]
    held = HeldEngine(client, monkeypatch)

    def broken() -> None:
        raise RuntimeError("a bug outside any batch")

    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(client.post, "/predict", json={"inputs": "held"})
        assert held.entered.wait(10)
        monkeypatch.setattr(engine, "_take_batch", broken)  # its next call kills the worker
        held.release()
        assert first.result(timeout=10).status_code == 200
    for t in engine._threads:
        t.join(timeout=10)
    assert_error(client.get("/healthz"), 503, "unavailable")
    r = client.get("/readyz")
    assert_error(r, 503, "unavailable")
    assert r.json()["error"] == "failed"
    assert_error(client.post("/predict", json={"inputs": "a"}), 503, "unavailable")


def flip_a_byte(model_dir: Path, name: str) -> None:
    data = bytearray((model_dir / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (model_dir / name).write_bytes(bytes(data))


def test_a_tampered_weights_file_stops_start_up_naming_the_file(
    tiny_model_dir: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = shutil.copytree(tiny_model_dir, tmp_path / "tiny")
    flip_a_byte(model, "weights.safetensors")
    app: FastAPI = create_app(build_settings(model))
    with (
        caplog.at_level(logging.ERROR, logger="exitserve"),
        pytest.raises(Exception, match=r"sha256 mismatch .*weights\.safetensors"),
        TestClient(app),
    ):
        pass  # the lifespan refuses to start
    assert "weights.safetensors" in caplog.text
    assert getattr(app.state, "engine", None) is None  # nothing could ever turn ready
