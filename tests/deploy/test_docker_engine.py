"""The CPU image built and run on a real Docker engine, and the compose stack under Compose v2.

The image is built by `scripts/docker-local.sh build` (a debootstrap base and a local
torch index: no registry needed). Without a Docker engine, debootstrap or root, the
tests that need them are skipped with the reason; once the image is built, every check
fails rather than skips. `.ci/run` installs and starts the engine, so CI runs them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.api.helpers import metric_samples, sample
from tests.deploy.conftest import DOCKER, ROOT, tool
from tests.server import free_port
from tests.tiny import random_texts

pytestmark = pytest.mark.slow

TAG = "exitserve:cpu"
GUARD_S = 180.0  # only reached when a check fails
MIN_FREE_GIB = 6
MIN_FREE_BYTES = MIN_FREE_GIB * 2**30


def docker(*args: str, timeout: float = 120, check: bool = True) -> str:
    r = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)}: {r.stderr.strip()[-2000:]}")
    return r.stdout.strip()


def logs(name: str) -> str:
    """What the container printed, both streams (the server logs to stderr)."""
    r = subprocess.run(["docker", "logs", name], capture_output=True, text=True, timeout=60)
    return r.stdout + r.stderr


def why_no_engine() -> str | None:
    """Why the image cannot be built here, or None when it can."""
    if shutil.which("docker") is None:
        return "no docker command"
    try:
        r = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer within 30 s"
    if r.returncode != 0:
        return f"no Docker engine answers: {r.stderr.strip()[:200]}"
    if shutil.which("debootstrap") is None:
        return "debootstrap is not installed (the base image is made with it)"
    if os.geteuid() != 0:
        return "not root (debootstrap and chroot need it)"
    return too_little_disk()


def too_little_disk() -> str | None:
    """Why the disk cannot hold the build, or None: the base, both stages, the compose
    stack's Prometheus and the torch index need about 4 GB."""
    root = subprocess.run(
        ["docker", "info", "--format", "{{.DockerRootDir}}"],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout.strip()
    for path in (root or "/var/lib/docker", tempfile.gettempdir()):
        if not os.path.exists(path):
            continue
        free = shutil.disk_usage(path).free
        if free < MIN_FREE_BYTES:
            return f"{free / 2**30:.1f} GiB free under {path}; the build needs {MIN_FREE_GIB}"
    return None


@pytest.fixture(scope="module")
def image() -> str:
    reason = why_no_engine()
    if reason is not None:
        pytest.skip(f"no image built: {reason}")
    # From here on a failure is a failure: the engine is there.
    docker_local("build", TAG)
    return TAG


def docker_local(*args: str) -> None:
    """scripts/docker-local.sh; what it printed is in the failure's message, where a
    CI log shows it."""
    r = subprocess.run(
        [str(ROOT / "scripts" / "docker-local.sh"), *args],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if r.returncode != 0:
        output = (r.stdout + r.stderr)[-3000:]
        raise AssertionError(f"docker-local.sh {' '.join(args)} exited {r.returncode}:\n{output}")


def wait_ready(url: str, name: str) -> None:
    stop = time.monotonic() + GUARD_S
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        state = docker("inspect", "--format", "{{.State.Status}}", name, check=False)
        assert state in ("created", "running"), f"container {state}: {logs(name)[-3000:]}"
        assert time.monotonic() < stop, f"never ready: {logs(name)[-3000:]}"
        time.sleep(0.5)


@pytest.fixture
def container(image: str) -> Iterator[tuple[str, str]]:
    """The image running as in production: read-only root, a tmpfs /tmp, no adaptation
    (so that the drain below has a backlog to drain)."""
    name = f"exitserve-test-{os.getpid()}-{free_port()}"
    port = free_port()
    docker(
        "run", "-d", "--name", name, "--read-only", "--tmpfs", "/tmp",
        "-p", f"127.0.0.1:{port}:8000",
        "-e", "EXITSERVE_LATENCY_TARGET_MS=0", "-e", "EXITSERVE_DRAIN_TIMEOUT_S=60",
        image,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, name)
        yield url, name
    finally:
        docker("rm", "-f", name, check=False)


def test_the_image_serves_as_a_read_only_non_root_healthy_container(
    container: tuple[str, str],
) -> None:
    url, name = container
    r = httpx.post(
        f"{url}/predict",
        json={"inputs": ["a gripping, beautifully acted film", "a dull, lifeless mess"]},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "rt-sentiment-minilm"
    assert [p["label"] for p in body["predictions"]] == ["positive", "negative"]
    assert all(1 <= p["exit_layer"] <= 6 for p in body["predictions"])
    info = httpx.get(f"{url}/info", timeout=10).json()
    assert (info["device"], info["dtype"], info["batch_invariant"]) == ("cpu", "int8", True)
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    m = metric_samples(metrics)
    assert sample(m, "exitserve_requests_total", endpoint="predict", status="200") == 1
    assert sample(m, "exitserve_requests_total", model="rt-sentiment-minilm") == 1
    assert docker("exec", name, "id", "-u") == "10001"
    # The root filesystem is read-only; /tmp is the one writable place.
    denied = subprocess.run(
        ["docker", "exec", name, "touch", "/app/x"], capture_output=True, text=True
    )
    assert denied.returncode != 0 and "Read-only file system" in denied.stderr
    docker("exec", name, "touch", "/tmp/x")
    # The image's HEALTHCHECK turns healthy (its first probe runs after 15 s).
    stop = time.monotonic() + GUARD_S
    while (health := docker("inspect", "--format", "{{.State.Health.Status}}", name)) != "healthy":
        assert health == "starting", f"health {health}: {docker('inspect', name)}"
        assert time.monotonic() < stop, "the healthcheck never passed"
        time.sleep(1)


def test_docker_stop_answers_the_requests_in_flight_then_exits_0(
    container: tuple[str, str],
) -> None:
    url, name = container
    texts = random_texts(64, seed=9, min_words=20, max_words=40)
    body = {"inputs": texts, "parameters": {"threshold": 1.0}}  # full depth: a backlog
    with ThreadPoolExecutor(4) as pool:
        futures = [
            pool.submit(httpx.post, f"{url}/predict", json=body, timeout=GUARD_S) for _ in range(4)
        ]
        stop = time.monotonic() + GUARD_S
        while True:  # every input admitted, many still waiting
            m = metric_samples(httpx.get(f"{url}/metrics", timeout=10).text)
            queued = sample(m, "exitserve_queue_size")
            if queued >= 64:
                break
            assert not all(f.done() for f in futures), "the backlog ran out before the stop"
            assert time.monotonic() < stop, "the requests were never admitted"
            time.sleep(0.02)
        docker("stop", "--time", "90", name, timeout=120)
        replies = [f.result(timeout=GUARD_S) for f in futures]
    assert [r.status_code for r in replies] == [200] * 4
    assert all(len(r.json()["predictions"]) == 64 for r in replies)
    state = json.loads(docker("inspect", "--format", "{{json .State}}", name))
    assert (state["Status"], state["ExitCode"], state["OOMKilled"]) == ("exited", 0, False)
    assert "engines stopped (drained)" in logs(name)


def test_the_image_serves_both_models_as_a_process_each_and_stops_them_cleanly(
    image: str,
) -> None:
    """The two-model deployment (k8s/overlays/cpu-two-models) in the image as run in
    production: the front end and its model processes under a read-only root, their
    sockets in the tmpfs /tmp."""
    name = f"exitserve-two-{os.getpid()}-{free_port()}"
    port = free_port()
    models = "/app/models/rt-sentiment-minilm,/app/models/bbc-topic-minilm"
    docker(
        "run", "-d", "--name", name, "--read-only", "--tmpfs", "/tmp",
        "-p", f"127.0.0.1:{port}:8000", "-e", f"EXITSERVE_MODEL_DIR={models}", image,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, name)
        text = {"inputs": ["shares fell as the bank cut its forecast"]}
        topic = httpx.post(f"{url}/predict", json={**text, "model": "bbc-topic-minilm"})
        assert topic.status_code == 200 and topic.json()["predictions"][0]["label"] == "business"
        assert httpx.post(f"{url}/predict", json=text).json()["model"] == "rt-sentiment-minilm"
        index = httpx.post(f"{url}/v2/repository/index", timeout=10).json()
        assert [m["state"] for m in index] == ["READY", "READY"]
        docker("stop", "--time", "60", name, timeout=90)
        state = json.loads(docker("inspect", "--format", "{{json .State}}", name))
        assert (state["Status"], state["ExitCode"]) == ("exited", 0), logs(name)[-3000:]
        assert logs(name).count("engines stopped (drained)") == 2  # each model's own drain
    finally:
        docker("rm", "-f", name, check=False)


# -- Compose v2 ---------------------------------------------------------------------------
def compose(
    *args: str, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("docker-compose"), "-f", str(DOCKER / "compose.yaml"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_compose_v2_accepts_the_stack() -> None:
    assert (
        "v2."
        in subprocess.run(
            [tool("docker-compose"), "version"], capture_output=True, text=True, check=True
        ).stdout
    )
    r = compose("config", "--format", "json")
    assert r.returncode == 0, r.stderr
    services = json.loads(r.stdout)["services"]
    assert set(services) == {"exitserve", "prometheus", "grafana"}
    s = services["exitserve"]
    assert (s["image"], s["read_only"], s["tmpfs"]) == ("exitserve:cpu", True, ["/tmp"])


PROMETHEUS = "exitserve-prometheus:bookworm"


@pytest.fixture(scope="module")
def prometheus_image(image: str) -> str:
    """Prometheus from Debian's package, for the compose stack (no registry here)."""
    docker_local("prometheus", PROMETHEUS)
    return PROMETHEUS


def prometheus_value(query: str) -> float | None:
    r = httpx.get("http://127.0.0.1:9090/api/v1/query", params={"query": query}, timeout=10)
    result = r.json()["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def test_compose_v2_brings_the_service_and_prometheus_up_and_down(
    image: str, prometheus_image: str
) -> None:
    # The stack's own ports: skip rather than fight something else for them.
    for port in (8000, 9090):
        try:
            httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
            pytest.skip(f"port {port} is taken on this machine")
        except httpx.HTTPError:
            pass
    env = {**os.environ, "PROMETHEUS_IMAGE": prometheus_image}
    r = compose("up", "-d", "--no-build", "exitserve", "prometheus", env=env)
    try:
        assert r.returncode == 0, r.stderr
        name = compose("ps", "-q", "exitserve", env=env).stdout.strip()
        wait_ready("http://127.0.0.1:8000", name)
        r2 = httpx.post("http://127.0.0.1:8000/predict", json={"inputs": "great fun"}, timeout=30)
        assert r2.status_code == 200 and r2.json()["predictions"][0]["label"] == "positive"
        # Prometheus scrapes the service (every 15 s) with the stack's own config and
        # rules, and answers queries on what it scraped.
        stop = time.monotonic() + GUARD_S
        while True:
            try:
                up = prometheus_value('up{job="exitserve"}')
                served = prometheus_value('exitserve_requests_total{endpoint="predict"}')
            except (httpx.HTTPError, KeyError, ValueError):
                up = served = None
            if up == 1.0 and served is not None and served >= 1:
                break
            assert time.monotonic() < stop, f"Prometheus never scraped the service: {up}"
            time.sleep(1)
        rules = httpx.get("http://127.0.0.1:9090/api/v1/rules", timeout=10).json()
        names = {r["name"] for g in rules["data"]["groups"] for r in g["rules"]}
        assert {"ExitserveDegraded", "ExitserveNotReady"} <= names
    finally:
        down = compose("down", "--timeout", "30", env=env)
    assert down.returncode == 0, down.stderr
