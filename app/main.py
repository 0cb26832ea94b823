"""The service: `create_app(settings)`, and `app` for `uvicorn app.main:app`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app import __version__
from app.api import health, info, oip, predict
from app.api.middleware import ServiceMiddleware
from app.config import Settings
from app.engine.registry import registry_for
from app.errors import install as install_errors

log = logging.getLogger("exitserve")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    s: Settings = app.state.settings
    try:
        registry, metrics = registry_for(s)
    except Exception as e:
        log.error("cannot serve the models in %s: %s", s.model_dir, e)
        raise
    app.state.metrics = metrics
    if len(registry.names) > 1 and s.isolation == "process":
        log.warning(
            "isolation=process is `exitserve serve`'s front end (app.front); this app serves"
            " its %d models in one process, as isolation=thread",
            len(registry.names),
        )
    for name in registry.names:
        try:
            await asyncio.to_thread(registry.load, name)
        except Exception as e:
            # One line that says why (a tampered file names itself); the server then
            # exits without ever turning ready.
            log.error("cannot serve %s from %s: %s", name, registry.entry(name).model_dir, e)
            await asyncio.to_thread(registry.stop, 0.0)
            raise
    app.state.registry = registry
    try:
        yield
    finally:
        drained = await asyncio.to_thread(registry.stop, s.drain_timeout_s)
        log.info("engines stopped (%s)", "drained" if drained else "drain timed out")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    app = FastAPI(
        title="exitserve",
        version=__version__,
        summary="Multi-exit classifier serving with per-input early exit",
        lifespan=lifespan,
    )
    app.state.settings = settings
    install_errors(app, settings.overload_status)
    for r in (
        predict.router,
        oip.infer_router,
        oip.router,
        oip.repository_router,
        health.router,
        info.router,
    ):
        app.include_router(r)
    app.add_middleware(
        ServiceMiddleware,
        max_body_bytes=settings.max_body_bytes,
        state=app.state,
        overload_status=settings.overload_status,
    )
    return app


def __getattr__(name: str) -> FastAPI:
    # `uvicorn app.main:app` reads settings from the environment only when it asks for the
    # app, so importing this module (tests, tools) builds nothing.
    if name == "app":
        return create_app()
    raise AttributeError(name)
