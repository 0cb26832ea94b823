"""Fuzz every operation of the app's own OpenAPI schema with schemathesis.

No generated request, valid or not, may get a 5xx, and every documented response must
match its schema. The one 5xx allowed is a 504 for a deadline the request itself set
(`timeout_ms: 1` can pass before a worker takes the input): that is the contract.
The schema comes from `app.openapi()` (building an app loads nothing); the requests
go to a second app whose lifespan runs for the whole module.

Why not `schemathesis.pytest.from_fixture`: with pytest 9 its lazy loader fails
(`'Function' object has no attribute '_nodeid'`), so the schema is built at import and
the live app is reached through schemathesis' in-process ASGI session.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import requests
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import response_schema_conformance

from app.main import create_app
from tests.api.conftest import build_settings

pytestmark = pytest.mark.slow

# The OpenAPI document does not depend on the model, so this app is never started.
schema = schemathesis.openapi.from_dict(
    create_app(build_settings(Path("unused-model-dir"))).openapi()
)


@pytest.fixture(scope="module")
def session(make_app: Callable[..., FastAPI]) -> Iterator[requests.Session]:
    app = make_app()
    with TestClient(app):  # runs the lifespan: engine and metrics on app.state
        # Not entered as a context manager, so it does not start a second lifespan.
        yield asgi.get_client(cast(Any, app))


def no_server_error(ctx: Any, response: Any, case: schemathesis.Case) -> bool | None:
    if response.status_code == 504 and response.json().get("error_type") == "timeout":
        return None
    return not_a_server_error(ctx, response, case)


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors_and_responses_match_the_schema(
    case: schemathesis.Case, session: requests.Session
) -> None:
    case.call_and_validate(
        base_url="http://testserver",
        session=session,
        checks=[no_server_error, response_schema_conformance],
    )
