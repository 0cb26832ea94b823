"""Domain errors and the one table that maps them to HTTP answers.

Every error leaves as JSON `{"error": ..., "error_type": ...}`. Messages are built
from what the service knows (validation error locations, limits), never from
`str(exc)` of an unexpected exception, which can carry paths or internals.
"""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.engine.errors import (
    DeadlineExceeded,
    Draining,
    InferenceFailed,
    InputTooLong,
    NotRunning,
    Overloaded,
    TooLate,
    UnknownModel,
)
from app.http import clip, error_body, unknown_model

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error the API raises itself, with a message safe to show the client."""

    status = 400
    error_type = "bad_request"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(ApiError):
    status, error_type = 422, "validation"


class TooLarge(ApiError):
    status, error_type = 413, "too_large"


class Unauthorized(ApiError):
    status, error_type = 401, "unauthorized"


class ModelNotFound(ApiError):
    status, error_type = 404, "not_found"


# Engine errors -> (status, error_type, client message). Overloaded's status is a
# setting (429 or 503), resolved when the handlers are installed.
ENGINE_ERRORS: dict[type[Exception], tuple[int, str, str]] = {
    Overloaded: (429, "overloaded", "server overloaded; retry later"),
    TooLate: (429, "overloaded", "server cannot answer within the deadline now; retry later"),
    Draining: (503, "unavailable", "server is shutting down"),
    NotRunning: (503, "unavailable", "model not ready"),
    InferenceFailed: (500, "internal", "internal error"),
    DeadlineExceeded: (504, "timeout", "deadline passed before the request could run"),
    UnknownModel: (404, "not_found", "unknown model"),
    InputTooLong: (413, "too_large", "an input is over the model's token limit"),
}
RETRY_AFTER_S = "1"


def retry_after(late: Exception | float) -> str:
    """Retry-After in whole seconds (at least 1): when the engine expects to have room,
    from a refusal or from the seconds the request would have been late."""
    seconds = late if isinstance(late, float) else getattr(late, "retry_after_s", 1.0)
    return str(max(1, math.ceil(seconds)))


def validation_message(exc: RequestValidationError) -> str:
    parts = []
    for e in exc.errors()[:5]:
        # A location holds client-chosen keys (an unknown field's name): clip each part.
        loc = ".".join(clip(x) for x in e.get("loc", ()) if x != "body")
        msg = clip(str(e.get("msg", "invalid value")).removeprefix("Value error, "), 200)
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts) or "invalid request"


# Refusals counted in exitserve_rejected_total, by reason.
REJECT_REASON: dict[type[Exception], str] = {
    Overloaded: "overloaded",
    Draining: "draining",
    TooLarge: "too_large",
    InputTooLong: "too_large",
    DeadlineExceeded: "deadline",
    TooLate: "expected_wait",
}


def _count_rejection(request: Request, exc: Exception) -> None:
    reason = REJECT_REASON.get(type(exc))
    metrics = getattr(request.app.state, "metrics", None)
    if reason is not None and metrics is not None:
        metrics.reject(reason, request.scope.get("model", ""))


def install(app: FastAPI, overload_status: int) -> None:
    table = dict(ENGINE_ERRORS)
    for refused in (Overloaded, TooLate):
        table[refused] = (overload_status, *ENGINE_ERRORS[refused][1:])

    async def api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        _count_rejection(request, exc)
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(error_body(exc.message, exc.error_type), exc.status, headers=headers)

    async def engine_error(request: Request, exc: Exception) -> JSONResponse:
        _count_rejection(request, exc)
        status, kind, message = table[type(exc)]
        if isinstance(exc, UnknownModel):
            return JSONResponse(unknown_model(exc.name, exc.served), status)
        if isinstance(exc, InputTooLong):
            message = (
                f"an input has {exc.length} tokens; the model's limit is {exc.limit}"
                " (parameters.truncate is false)"
            )
        headers = {"Retry-After": retry_after(exc)} if status in (429, 503) else None
        return JSONResponse(error_body(message, kind), status, headers=headers)

    async def invalid(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return JSONResponse(error_body(validation_message(exc), "validation"), 422)

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 400:
            # FastAPI answers 400 when a JSON body cannot be decoded at all (bad UTF-8,
            # nesting past the parser's limit); to clients that is invalid input like any other.
            return JSONResponse(error_body("request body is not valid JSON", "validation"), 422)
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http")
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        return JSONResponse(error_body(message, kind), exc.status_code, headers=exc.headers)

    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error", exc_info=exc)
        return JSONResponse(error_body("internal error", "internal"), 500)

    app.add_exception_handler(ApiError, api_error)
    for kind in table:
        app.add_exception_handler(kind, engine_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
