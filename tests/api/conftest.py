"""Apps on the tiny random model, and clients that run their lifespan.

`client` is one app per test module (read-only tests share it); `serve(**settings)`
builds a fresh app with its own settings for tests that change state or limits. Clients
see a 500 as a real client would (a JSON answer), not as an exception re-raised in the
test, so tests can check what leaves the server.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app

# Small and deterministic: one torch thread (a training job shares the CPU), and the
# default CPU path (int8), so every batched-equals-alone check runs on what users get.
BASE_SETTINGS: dict[str, Any] = {
    "device": "cpu",
    "quantization": "int8",
    "threads": 1,
    "max_queue_delay_ms": 1,
}


def build_settings(default_dir: Path, **overrides: Any) -> Settings:
    """Settings from arguments only: EXITSERVE_* variables of the shell must not leak in.
    `model_dir` among the overrides replaces `default_dir`."""
    with pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):
            if name.upper().startswith("EXITSERVE_"):
                mp.delenv(name)
        return Settings(**{"model_dir": default_dir, **BASE_SETTINGS, **overrides})


@pytest.fixture(scope="session")
def make_settings(tiny_model_dir: Path) -> Callable[..., Settings]:
    return lambda **overrides: build_settings(tiny_model_dir, **overrides)


@pytest.fixture(scope="session")
def make_app(make_settings: Callable[..., Settings]) -> Callable[..., FastAPI]:
    return lambda **overrides: create_app(make_settings(**overrides))


@pytest.fixture(scope="module")
def client(make_app: Callable[..., FastAPI]) -> Iterator[TestClient]:
    """The default app, shared by a module's tests: do not drain or block its engine."""
    with TestClient(make_app(), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def serve(make_app: Callable[..., FastAPI]) -> Iterator[Callable[..., TestClient]]:
    """`serve(**settings)` starts a fresh app; its lifespan ends with the test."""
    with ExitStack() as stack:
        yield lambda **overrides: stack.enter_context(
            TestClient(make_app(**overrides), raise_server_exceptions=False)
        )


@asynccontextmanager
async def async_client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client in the caller's event loop, with the app's lifespan around it."""
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            yield c


@pytest.fixture(scope="module")
def model_info(client: TestClient) -> dict[str, Any]:
    info: dict[str, Any] = client.get("/info").json()
    return info
