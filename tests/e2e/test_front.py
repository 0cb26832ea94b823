"""Several models served as a process each behind one front end (`app.front`): the real
server, started as `exitserve serve` with two tiny models."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.soak import children
from devtools.server_process import exitserve_env
from tests.api.helpers import metric_samples, sample
from tests.server import ROOT, free_port, server_process
from tests.tiny import make_tiny_model, random_texts

pytestmark = pytest.mark.slow

TOPICS = ("business", "sport", "tech")
KEY = {"authorization": "Bearer k1"}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("front")
    return (
        make_tiny_model(root / "tiny"),
        make_tiny_model(root / "topics", num_layers=3, labels=TOPICS, seed=3),
    )


def settings(dirs: tuple[Path, Path], **more: str) -> dict[str, str]:
    return {"model_dir": f"{dirs[0]},{dirs[1]}", "threads": "2", "log_level": "warning", **more}


@pytest.fixture(scope="module")
def front(dirs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    logs = tmp_path_factory.mktemp("logs")
    # Three threads split by weight: one for tiny, two for topics (MODEL_WEIGHTS).
    s = settings(dirs, api_keys="k1", threads="3", model_weights="topics=2")
    with server_process(s, logs / "front.log") as (url, _):
        yield url


def ask(url: str, texts: list[str], model: str | None = None, **params: Any) -> httpx.Response:
    body: dict[str, Any] = {"inputs": texts, "parameters": params}
    if model is not None:
        body["model"] = model
    return httpx.post(f"{url}/predict", json=body, headers=KEY, timeout=30)


def model_processes(pid: int) -> list[int]:
    """The server's model processes: its children, once their fork server has exited."""
    return children(pid)


def test_each_model_answers_as_a_server_of_it_alone(
    front: str, dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    texts = random_texts(12, seed=11)
    alone_settings = {"model_dir": str(dirs[1]), "threads": "1", "log_level": "warning"}
    with server_process(alone_settings, tmp_path / "alone.log") as (alone, _):
        for params in ({}, {"threshold": 1.0}, {"max_layers": 2}):
            served = ask(front, texts, "topics", all_scores=True, **params)
            own = httpx.post(f"{alone}/predict", json={"inputs": texts, "parameters":
                             {"all_scores": True, **params}}, timeout=30)  # fmt: skip
            assert served.status_code == own.status_code == 200, served.text
            assert served.json()["model"] == "topics"
            assert served.json()["predictions"] == own.json()["predictions"]  # same bits
        infer = {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES",
                             "data": texts[:2]}]}  # fmt: skip
        together = httpx.post(f"{front}/v2/models/topics/infer", json=infer, headers=KEY)
        by_itself = httpx.post(f"{alone}/v2/models/topics/infer", json=infer)
        assert together.status_code == 200 and together.json() == by_itself.json()
    default = ask(front, texts)
    assert default.status_code == 200 and default.json()["model"] == "tiny"
    assert len(default.headers.get_list("date")) == 1  # the front end's, not the model's too
    assert float(default.headers["x-total-time"]) > 0  # the model's server's own timing
    assert {p["label"] for p in default.json()["predictions"]} <= {"negative", "positive"}


def test_unknown_models_too_large_bodies_and_keys_are_refused_in_json(front: str) -> None:
    r = ask(front, ["a"], "nope")
    assert r.status_code == 404 and r.json()["error_type"] == "not_found"
    assert "['tiny', 'topics']" in r.json()["error"]
    r = httpx.post(f"{front}/v2/models/nope/infer", json={}, headers=KEY)
    assert r.status_code == 404 and "nope" in r.json()["error"]
    r = httpx.post(f"{front}/predict", content=b"x" * (1_048_576 + 1), headers=KEY)
    assert r.status_code == 413 and r.json()["error_type"] == "too_large"
    # The model's own server checks keys and validates bodies; the front end passes
    # both answers on as they are.
    r = httpx.post(f"{front}/predict", json={"inputs": ["a"], "model": "topics"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    r = httpx.post(f"{front}/predict", json={"inputs": [], "model": "topics"}, headers=KEY)
    assert r.status_code == 422 and r.json()["error_type"] == "validation"
    assert httpx.post(f"{front}/v2/repository/index").status_code == 401
    # Without a key, an unknown model is not named as such (nor are the models served).
    r = httpx.post(f"{front}/predict", json={"inputs": ["a"], "model": "nope"})
    assert r.status_code == 401 and "tiny" not in r.text
    assert httpx.get(f"{front}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{front}/v2").json()["extensions"] == [
        "binary_tensor_data",
        "model_repository",
    ]
    assert httpx.get(f"{front}/no/such/route").status_code == 404


def test_index_info_health_and_metrics_cover_both_models(front: str) -> None:
    index = httpx.post(f"{front}/v2/repository/index", headers=KEY).json()
    assert [(m["name"], m["state"]) for m in index] == [("tiny", "READY"), ("topics", "READY")]
    ready = httpx.post(f"{front}/v2/repository/index", json={"ready": True}, headers=KEY)
    assert len(ready.json()) == 2
    r = httpx.post(f"{front}/v2/repository/models/topics/unload", headers=KEY)
    assert r.status_code == 400 and "explicit" in r.json()["error"]  # model control: none
    info = httpx.get(f"{front}/info").json()
    assert info["model"] == "tiny"
    assert [(m["model"], m["num_layers"], m["state"]) for m in info["models"]] == [
        ("tiny", 4, "READY"),
        ("topics", 3, "READY"),
    ]
    assert info["shares"]["threads"] == {"tiny": 1, "topics": 2}
    assert info["shares"]["weights"] == {"tiny": 1.0, "topics": 2.0}
    # Each model's server runs its share: a worker per thread on the CPU.
    assert [m["workers"] for m in info["models"]] == [1, 2]
    assert httpx.get(f"{front}/readyz").status_code == 200
    assert httpx.get(f"{front}/v2/health/ready").json() == {"ready": True}
    meta = httpx.get(f"{front}/v2/models/topics", headers=KEY).json()
    assert meta["parameters"]["labels"] == list(TOPICS)

    before = metric_samples(httpx.get(f"{front}/metrics").text)
    assert ask(front, ["one", "two"], "topics").status_code == 200
    assert ask(front, ["three"]).status_code == 200
    assert ask(front, ["x"], "nope").status_code == 404
    scraped = httpx.get(f"{front}/metrics")
    text = scraped.text
    assert scraped.headers["content-type"].startswith("text/plain; version=")
    assert text.count("# TYPE exitserve_requests_total counter") == 1
    if shutil.which("promtool"):  # Prometheus' own linter accepts the merged page
        lint = subprocess.run(["promtool", "check", "metrics"], input=text, text=True,
                              capture_output=True, timeout=30)  # fmt: skip
        assert lint.returncode == 0, lint.stdout + lint.stderr
    after = metric_samples(text)

    def grew(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert sample(after, "exitserve_ready", model="tiny") == 1
    assert sample(after, "exitserve_ready", model="topics") == 1
    assert grew("exitserve_requests_total", endpoint="predict", status="200", model="topics") == 1
    assert grew("exitserve_requests_total", endpoint="predict", status="200", model="tiny") == 1
    assert grew("exitserve_requests_total", endpoint="predict", status="404") == 1
    assert grew("exitserve_exits_total", model="topics") == 2
    # The front end times each request it forwarded, per model (the model process's
    # time and the hop to it and back); a refusal it gave itself is not one of them.
    # (No comparison of the two times: the model process stops its clock after its
    # last byte is written, which may be after the front end has read it.)
    front = "exitserve_front_request_duration_seconds"
    for model in ("tiny", "topics"):
        assert grew(f"{front}_count", endpoint="predict", model=model) == 1
        assert grew(f"{front}_bucket", endpoint="predict", model=model, le="+Inf") == 1
        assert grew(f"{front}_sum", endpoint="predict", model=model) > 0
    assert not [k for k in after if k[0] == f"{front}_count" and ("model", "nope") in k[1]]


class Traffic:
    """Requests to a model from a thread, one after another, until stopped; each status
    (or the exception's name) is kept."""

    def __init__(self, url: str, model: str | None, inputs: int = 4) -> None:
        self.url, self.model, self.inputs = url, model, inputs
        self.statuses: list[int | str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        texts = random_texts(self.inputs, seed=5, min_words=20, max_words=40)
        while not self._stop.is_set():
            try:
                self.statuses.append(ask(self.url, texts, self.model).status_code)
            except httpx.HTTPError as e:
                self.statuses.append(type(e).__name__)

    def stop(self) -> list[int | str]:
        self._stop.set()
        self._thread.join(30)
        return self.statuses


def test_unloading_one_model_answers_its_admitted_work_and_leaves_the_other_serving(
    dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    s = settings(dirs, api_keys="k1", model_control="explicit")
    with server_process(s, tmp_path / "front.log") as (url, proc):
        first = ask(url, ["a steady text"], "topics").json()["predictions"]
        kept, dropped = Traffic(url, None), Traffic(url, "topics", inputs=32)
        time.sleep(0.5)
        r = httpx.post(f"{url}/v2/repository/models/topics/unload", headers=KEY, timeout=60)
        assert r.status_code == 200, r.text
        time.sleep(0.3)
        index = httpx.post(f"{url}/v2/repository/index", headers=KEY).json()
        assert index[1] == {"name": "topics", "version": "1", "state": "UNAVAILABLE",
                            "reason": "unloaded"}  # fmt: skip
        gone = ask(url, ["a"], "topics")
        assert gone.status_code == 503 and gone.json()["error_type"] == "unavailable"
        assert httpx.get(f"{url}/readyz").status_code == 200  # an unloaded model is not waited for
        served, refused = kept.stop(), dropped.stop()
        assert served and set(served) == {200}  # the other model never missed a request
        assert 200 in refused and set(refused) <= {200, 503}  # answered or refused, never lost
        assert len(model_processes(proc.pid)) == 1

        r = httpx.post(f"{url}/v2/repository/models/topics/load", headers=KEY, timeout=60)
        assert r.status_code == 200, r.text
        assert ask(url, ["a steady text"], "topics").json()["predictions"] == first
        info = httpx.get(f"{url}/info").json()
        assert [m["state"] for m in info["models"]] == ["READY", "READY"]


@pytest.fixture
def running(
    dirs: tuple[Path, Path], tmp_path: Path
) -> Iterator[tuple[str, subprocess.Popen[bytes], list[int]]]:
    """A server of both models: its URL, its process and its two model processes."""
    with server_process(settings(dirs), tmp_path / "front.log") as (url, proc):
        models = model_processes(proc.pid)
        assert len(models) == 2
        yield url, proc, models


def test_sigterm_drains_every_model_process_then_exits_0(
    running: tuple[str, subprocess.Popen[bytes], list[int]],
) -> None:
    url, proc, models = running
    traffic = [Traffic(url, None, inputs=32), Traffic(url, "topics", inputs=32)]
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    statuses = [s for t in traffic for s in t.stop()]
    answered = [s for s in statuses if s == 200]
    # Every request the server took was answered (200, or 503 once draining); the
    # rest met a closed port or a connection closed before its request was read
    # (RemoteProtocolError, or ReadError when the close is a reset).
    lost_before_read = {"ConnectError", "RemoteProtocolError", "ReadError"}
    assert answered and set(statuses) <= {200, 503, *lost_before_read}
    for pid in models:
        assert not Path(f"/proc/{pid}").exists() or _zombie(pid)


def _zombie(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ")[1].startswith("Z")


def test_a_model_process_that_dies_fails_liveness_and_the_other_serves_on(
    running: tuple[str, subprocess.Popen[bytes], list[int]],
) -> None:
    url, _, models = running
    os.kill(models[1], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while httpx.get(f"{url}/healthz").status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert httpx.get(f"{url}/healthz").status_code == 503
    index = httpx.post(f"{url}/v2/repository/index").json()
    assert sorted(m["state"] for m in index) == ["READY", "UNAVAILABLE"]
    alive = next(m["name"] for m in index if m["state"] == "READY")
    assert ask(url, ["still here"], alive).status_code == 200


def test_a_duplicate_model_name_stops_start_up_naming_both_directories(
    dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    env = exitserve_env(free_port(), {"model_dir": f"{dirs[1]},{dirs[1]}"})
    r = subprocess.run([sys.executable, "-m", "app.cli", "serve"], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 3
    assert "two models named 'topics'" in r.stderr and "Traceback" not in r.stderr


def test_a_model_not_ready_within_the_load_timeout_is_killed_and_start_up_fails(
    dirs: tuple[Path, Path],
) -> None:
    port = free_port()
    env = exitserve_env(port, settings(dirs, load_timeout_s="0.05"))
    r = subprocess.run([sys.executable, "-m", "app.cli", "serve"], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 3, r.stderr[-2000:]
    assert "not ready within LOAD_TIMEOUT_S (0.05 s)" in r.stderr
    assert "Traceback" not in r.stderr
    # No model process outlives the server: none has its port in its environment.
    mark = f"EXITSERVE_PORT={port}".encode()
    left = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if mark in (proc / "environ").read_bytes().split(b"\0"):
                    left.append(int(proc.name))
            except OSError:
                continue
    assert left == []
