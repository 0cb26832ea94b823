"""Typed dependencies: what the routes get from app.state.

All `async def`: FastAPI runs plain `def` dependencies in a worker thread, a thread
hop per dependency per request for what is an attribute lookup.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.config import Settings, authorized
from app.engine.errors import NotRunning
from app.engine.registry import ModelRegistry
from app.engine.scheduler import Engine
from app.errors import Unauthorized
from app.metrics import Metrics


async def get_registry(request: Request) -> ModelRegistry:
    registry: ModelRegistry | None = getattr(request.app.state, "registry", None)
    if registry is None:
        raise NotRunning("models not loaded yet")
    return registry


async def engine_for(request: Request, name: str | None = None) -> Engine:
    """The engine of model `name` (None: the default), noted in the request's scope for
    the request metrics (`middleware`)."""
    engine = (await get_registry(request)).engine(name)
    request.scope["model"] = engine.runtime.name
    return engine


async def get_engine(request: Request) -> Engine:
    """The default model's engine."""
    return await engine_for(request)


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


EngineDep = Annotated[Engine, Depends(get_engine)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]


async def require_api_key(request: Request) -> None:
    """With EXITSERVE_API_KEYS set, inference routes need `Authorization: Bearer <key>`.

    Reads the settings from app.state itself: every nested dependency costs FastAPI's
    resolver time on every inference request.
    """
    settings: Settings = request.app.state.settings
    if not authorized(request.headers.get("authorization", ""), settings.keys):
        raise Unauthorized("missing or invalid API key")
