"""Typed dependencies: what the routes get from app.state.

All `async def`: FastAPI runs plain `def` dependencies in a worker thread, a thread
hop per dependency per request for what is an attribute lookup.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from typing import Annotated

from fastapi import Depends, Request

from app.config import Settings
from app.engine.errors import NotRunning
from app.engine.scheduler import Engine
from app.errors import Unauthorized
from app.metrics import Metrics


async def get_engine(request: Request) -> Engine:
    engine: Engine | None = getattr(request.app.state, "engine", None)
    if engine is None:
        raise NotRunning("model not loaded yet")
    return engine


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


EngineDep = Annotated[Engine, Depends(get_engine)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]


def authorized(authorization: str, keys: Sequence[str]) -> bool:
    """True when no keys are configured or the header is `Bearer <one of the keys>`."""
    if not keys:
        return True
    scheme, _, token = authorization.partition(" ")
    given = token.strip().encode()
    # Compare against every key, always, so timing reveals neither key nor position.
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(given, key.encode())
    return scheme.lower() == "bearer" and ok


async def require_api_key(request: Request) -> None:
    """With EXITSERVE_API_KEYS set, inference routes need `Authorization: Bearer <key>`.

    Reads the settings from app.state itself: every nested dependency costs FastAPI's
    resolver time on every inference request.
    """
    settings: Settings = request.app.state.settings
    if not authorized(request.headers.get("authorization", ""), settings.keys):
        raise Unauthorized("missing or invalid API key")
