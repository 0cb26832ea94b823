"""Small assertions and readers shared by the API tests."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Mapping
from typing import Any, Protocol

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families


class Reply(Protocol):
    """An HTTP response: httpx's, or httpx2's (Starlette's TestClient)."""

    @property
    def status_code(self) -> int: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def text(self) -> str: ...
    def json(self) -> Any: ...


class Poster(Protocol):
    def post(self, url: str, *, json: Any = None) -> Any: ...


GUARD_S = 30.0  # only ever reached when a test fails

# Two or more path segments, or a Windows drive: what a leaked file path looks like.
_PATH = re.compile(r"(?:/[\w.-]+){2,}|[A-Za-z]:\\")


def assert_error(r: Reply, status: int, error_type: str | None = None) -> dict[str, str]:
    """The one error shape: JSON with exactly `error` and `error_type`, and no internals."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"error", "error_type"}, body
    assert isinstance(body["error"], str) and body["error"], body
    assert isinstance(body["error_type"], str) and body["error_type"], body
    if error_type is not None:
        assert body["error_type"] == error_type, body
    for leak in ("Traceback", "/work", "site-packages", 'File "', ".py"):
        assert leak not in r.text, r.text
    assert not _PATH.search(r.text), r.text
    return body


def predictions(r: Reply) -> list[dict[str, Any]]:
    assert r.status_code == 200, r.text
    preds: list[dict[str, Any]] = r.json()["predictions"]
    return preds


def predict(client: Poster, inputs: str | list[str], **parameters: Any) -> list[dict[str, Any]]:
    return predictions(client.post("/predict", json={"inputs": inputs, "parameters": parameters}))


def metric_samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text page, keyed by sample name and labels."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(client: TestClient) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the app's /metrics page."""
    r = client.get("/metrics")
    assert r.status_code == 200
    return metric_samples(r.text)


def sample(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    """The sum of `name`'s series that carry these label values (PromQL's `sum(name{...})`:
    a label not given, `model` among them, is summed over)."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


class HeldEngine:
    """Holds the engine's worker inside its next batch until `release()`.

    The worker tokenizes each batch first, so wrapping the runtime's `tokenize` stops it
    with that batch admitted and in flight: the queue's load is then exactly known.
    """

    def __init__(
        self, client: TestClient, monkeypatch: pytest.MonkeyPatch, model: str | None = None
    ) -> None:
        registry = client.app.state.registry  # type: ignore[attr-defined]
        runtime = registry.engine(model).runtime
        self.entered, self.gate = threading.Event(), threading.Event()
        tokenize = runtime.tokenize

        def held(texts: list[str]) -> list[list[int]]:
            self.entered.set()
            self.gate.wait(10)
            return tokenize(texts)

        monkeypatch.setattr(runtime, "tokenize", held)

    def release(self) -> None:
        self.gate.set()


def wait_until_idle(client: TestClient) -> None:
    """Wait until the app's engine has nothing queued and nothing in flight.

    A worker settles an input's answer first; only then does it count the input in the
    metrics (exits, layers, durations), finish its batch (batch sizes), clear its busy
    mark (`stuck`) and take the batch out of flight (which frees queue room). A client
    can hold its answer before any of that: wait here before asserting on it.
    """
    engine = client.app.state.registry.engine()  # type: ignore[attr-defined]
    stop = time.monotonic() + GUARD_S
    while not engine.idle:
        assert time.monotonic() < stop, "the engine never went idle"
        time.sleep(0.001)
