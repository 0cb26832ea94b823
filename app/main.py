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
from app.engine.adapt import controller_for
from app.engine.runtime import load_runtime, time_batches, worker_plan
from app.engine.scheduler import Engine
from app.errors import install as install_errors
from app.metrics import Metrics

log = logging.getLogger("exitserve")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    s: Settings = app.state.settings
    workers, threads = worker_plan(s.device, s.threads, s.workers, s.batching == "continuous")
    try:
        # A row alone while the other workers idle may take their threads too.
        runtime = await asyncio.to_thread(
            load_runtime, s.model_dir, s.device, s.quantization, threads, s.int8_kernel,
            threads * workers,
        )  # fmt: skip
    except Exception as e:
        # One line that says why (a tampered file names itself); the server then exits
        # without ever turning ready.
        log.error("cannot serve the model in %s: %s", s.model_dir, e)
        raise
    controller = controller_for(
        runtime.ladder,
        runtime.name,
        s.latency_target_ms / 1000,
        s.max_accuracy_drop,
        workers,
        s.max_batch_size,
    )
    if controller.enabled:
        timed = await asyncio.to_thread(time_batches, runtime, s.max_batch_size)
        controller.costs.anchor([(controller.work(n, layers), t) for n, layers, t in timed])
    metrics = Metrics(runtime.num_layers)
    metrics.model_info.labels(runtime.name, runtime.version, runtime.device, runtime.dtype).set(1)
    engine = Engine(
        runtime,
        max_batch_size=s.max_batch_size,
        max_queue_delay_s=s.max_queue_delay_ms / 1000,
        max_queue_size=s.max_queue_size,
        observer=metrics,
        continuous=s.batching == "continuous",
        workers=workers,
        stuck_after_s=s.stuck_after_s,
        controller=controller,
    )
    engine.start()
    metrics.watch_readiness(lambda: engine.ready)
    metrics.watch_adaptation(engine.adaptation)
    app.state.metrics, app.state.engine = metrics, engine
    try:
        yield
    finally:
        drained = await asyncio.to_thread(engine.stop, s.drain_timeout_s)
        log.info("engine stopped (%s)", "drained" if drained else "drain timed out")


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
    for r in (predict.router, oip.infer_router, oip.router, health.router, info.router):
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
