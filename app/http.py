"""What the API and the front end (`app.front`) share, importing neither FastAPI nor
torch: error bodies, the endpoint label of a request, the model a body names, and the
server's OIP metadata."""

from __future__ import annotations

import json
from typing import Any

from app import __version__


def error_body(message: str, error_type: str) -> dict[str, str]:
    return {"error": message, "error_type": error_type}


def clip(value: object, limit: int = 40) -> str:
    """A client-sent value for an error message, cut short: a name or a field can be as
    long as the body limit allows, and an error must not echo a megabyte back."""
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
