"""What both peer servers share: the request and response schema, `/readyz` and the CLI."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, field_validator

MAX_INPUTS = 64  # exitserve's default MAX_INPUTS_PER_REQUEST


class PredictRequest(BaseModel):
    inputs: str | list[str]
    parameters: dict[str, Any] = Field(default_factory=dict)  # accepted, ignored

    @field_validator("inputs")
    @classmethod
    def _non_empty(cls, v: str | list[str]) -> str | list[str]:
        texts = [v] if isinstance(v, str) else v
        if not texts:
            raise ValueError("inputs is an empty list")
        if len(texts) > MAX_INPUTS:
            raise ValueError(f"at most {MAX_INPUTS} inputs per request, got {len(texts)}")
        if any(not t.strip() for t in texts):
            raise ValueError("inputs must not be empty or whitespace-only")
        return v

    def texts(self) -> list[str]:
        return [self.inputs] if isinstance(self.inputs, str) else list(self.inputs)


class Prediction(BaseModel):
    label: str
    score: float
    exit_layer: int


class PredictResponse(BaseModel):
    predictions: list[Prediction]


def add_readyz(app: FastAPI) -> None:
    """`GET /readyz`: 200 once the lifespan has set `app.state.ready`, 503 before."""
    app.state.ready = False

    @app.get("/readyz")
    def readyz(request: Request) -> JSONResponse:
        ready = bool(request.app.state.ready)
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)


def arg_parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=(doc or "").splitlines()[0])
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--log-level", default="warning")
    return p
