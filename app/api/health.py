"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.api.deps import EngineDep

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "not ready or draining"}})
async def readyz(engine: EngineDep) -> JSONResponse:
    if engine.ready:
        return JSONResponse({"status": "ready"})
    state = "draining" if engine.draining else "not ready"
    return JSONResponse({"error": state, "error_type": "unavailable"}, 503)
