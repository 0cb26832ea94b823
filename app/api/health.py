"""Liveness and readiness.

Readiness (`/readyz`) is false while the model loads, while draining, while a batch has
run past `EXITSERVE_STUCK_AFTER_S` and once a worker has died. Liveness (`/healthz`)
fails only when a worker has died: nothing in the process can bring it back, so a
restart is the cure, whereas a slow batch or a drain must not get the process killed.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from app.api.deps import RegistryDep
from app.engine.registry import ModelRegistry
from app.errors import error_body

router = APIRouter()

UNAVAILABLE: dict[int | str, dict[str, Any]] = {
    503: {"description": "not ready, draining, stuck or failed"}
}


@router.get("/healthz", responses={503: {"description": "an engine worker died"}})
async def healthz(request: Request) -> JSONResponse:
    registry: ModelRegistry | None = getattr(request.app.state, "registry", None)
    if registry is not None and registry.failed:
        return JSONResponse(error_body("engine failed", "unavailable"), 503)
    return JSONResponse({"status": "ok"})


@router.get("/readyz", responses=UNAVAILABLE)
async def readyz(registry: RegistryDep) -> JSONResponse:
    """Ready while every loaded model's engine is (an unloaded model is not waited for)."""
    state = registry.state()
    if state == "ready":
        return JSONResponse({"status": "ready"})
    return JSONResponse(error_body(state, "unavailable"), 503)
