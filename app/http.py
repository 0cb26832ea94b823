"""What the API and the front end (`app.front`) share, importing neither FastAPI nor
torch: error bodies, the endpoint label of a request, the model a body names, and the
server's OIP metadata."""

from __future__ import annotations

import json
from typing import Any

from starlette.types import Receive

from app import __version__
from app.config import authorized


def error_body(message: str, error_type: str) -> dict[str, str]:
    return {"error": message, "error_type": error_type}


def clip(value: object, limit: int = 40) -> str:
    """A client-sent value for an error message, cut short: a name or a field can be as
    long as the body limit allows, and an error must not echo a megabyte back."""
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def unknown_model(name: object, served: list[str]) -> dict[str, str]:
    """The 404 body for a model the server does not have, naming those it has."""
    return error_body(f"unknown model {clip(name)!r}; this server serves {served}", "not_found")


def body_too_large(limit: int) -> dict[str, str]:
    return error_body(f"request body exceeds {limit} bytes", "too_large")


def key_accepted(headers: list[tuple[bytes, bytes]], keys: tuple[str, ...]) -> bool:
    """Whether an ASGI request's Authorization header carries one of `keys` (any
    request, when none are configured)."""
    header = next((v for k, v in headers if k == b"authorization"), b"")
    return authorized(header.decode("latin-1"), keys)


def endpoint_of(path: str) -> str:
    if path == "/predict":
        return "predict"
    if path.startswith("/v2/models/") and path.endswith("/infer"):
        return "v2_infer"
    return "other"


def model_named(body: bytes | None) -> str | None:
    """The `model` a /predict body names; None for the default (or a body the route will
    refuse anyway)."""
    if not body or b'"model"' not in body:
        return None
    try:
        name = json.loads(body).get("model")
    except (ValueError, AttributeError, RecursionError):
        return None
    return name if isinstance(name, str) else None


def server_metadata() -> dict[str, Any]:
    """The Open Inference Protocol's server metadata (`GET /v2`)."""
    extensions = ["binary_tensor_data", "model_repository"]
    return {"name": "exitserve", "version": __version__, "extensions": extensions}


class BodyTooLarge(Exception):
    pass


async def read_body(receive: Receive, limit: int) -> bytes:
    """An ASGI request's body, whole (what came before a disconnect); BodyTooLarge once
    it passes `limit` bytes."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > limit:
            raise BodyTooLarge
        if not message.get("more_body", False):
            break
    return b"".join(chunks)
