"""ASGI middleware: early load shedding, request body limit and per-request metrics.

Pure ASGI (not BaseHTTPMiddleware) so streaming and cancellation behave and the cost
per request stays a few microseconds.

Shedding: while the engine's queue is full, an authorized inference request is refused
here, before its body is read, parsed and validated. The engine would refuse it
anyway; under a flood, rejecting through the whole FastAPI stack cost so much CPU that
the requests already admitted were served at a fraction of capacity. The same holds
for the load controller's refusals: while one more input would miss the latency
target even at the floor, a request whose body sets no deadline of its own (no
`timeout` in it: the target is its budget) is refused here with the controller's
Retry-After. Measured at 5x capacity, refusing those in the route left 16 answers/s.
"""

from __future__ import annotations

import json
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.engine.errors import TooLate
from app.errors import ENGINE_ERRORS, RETRY_AFTER_S, retry_after
from app.http import (
    BodyTooLarge,
    body_too_large,
    endpoint_of,
    error_body,
    key_accepted,
    model_named,
    read_body,
)
from app.metrics import Metrics

OVERLOADED = error_body("server overloaded; retry later", "overloaded")


class ServiceMiddleware:
    def __init__(
        self, app: ASGIApp, max_body_bytes: int, state: Any, overload_status: int = 429
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.state = state  # app.state: metrics and registry appear once the lifespan has run
        self.overload_status = overload_status
        self.overloaded_body = json.dumps(OVERLOADED).encode()
        self.late_body = json.dumps(error_body(ENGINE_ERRORS[TooLate][2], "overloaded")).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = endpoint_of(scope["path"])
        started = time.perf_counter()
        status = {"code": 500}
        metrics: Metrics | None = getattr(self.state, "metrics", None)

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            inference = endpoint != "other" and scope["method"] == "POST"
            declared = self._declared_length(scope)
            if declared is not None and declared > self.max_body_bytes:
                status["code"] = 413
                await self._too_large(send, metrics)
                return
            body: bytes | None = None

            async def buffer_body() -> bool:
                """Buffer the body (up to the limit; an excess is answered 413 here)."""
                nonlocal receive, body
                try:
                    receive, body = await self._buffered(receive)
                except BodyTooLarge:
                    status["code"] = 413
                    await self._too_large(send, metrics)
                    return False
                return True

            # No Content-Length (chunked): read it here, where an excess can still be
            # answered 413. Also when several models are served and one sheds: /predict
            # names its model in the body.
            chunked = declared is None and scope["method"] in ("POST", "PUT", "PATCH")
            if (chunked or (inference and self._needs_body(endpoint))) and not await buffer_body():
                return
            engine = self._engine(endpoint, scope, body) if inference else None
            # A draining engine refuses in the route: 503, shutting down, not "retry".
            if engine is not None and not engine.draining:
                scope["model"] = engine.runtime.name
                if engine.full and self._authorized(scope):
                    status["code"] = self.overload_status
                    await self._overloaded(send, metrics, scope)
                    return
                late = engine.late_by(1)
                if late is not None and self._authorized(scope):
                    if body is None and not await buffer_body():
                        return
                    if body is not None and b"timeout" not in body:
                        status["code"] = self.overload_status
                        await self._overloaded(
                            send, metrics, scope, "expected_wait", retry_after(late)
                        )
                        return
            await self.app(scope, receive, send_wrapper)
        finally:
            if metrics is not None:
                model = scope.get("model", "")
                metrics.requests.labels(endpoint, str(status["code"]), model).inc()
                metrics.request_duration.labels(endpoint, model).observe(
                    time.perf_counter() - started
                )

    def _needs_body(self, endpoint: str) -> bool:
        """Whether the model a /predict request names must be read before routing: with
        several models, while one of them refuses work."""
        registry = getattr(self.state, "registry", None)
        if endpoint != "predict" or registry is None or len(registry.names) < 2:
            return False
        return any(e.full or e.late_by(1) is not None for e in registry.engines())

    def _engine(self, endpoint: str, scope: Scope, body: bytes | None) -> Any:
        """The engine the request is for, if it is loaded (else the route answers)."""
        registry = getattr(self.state, "registry", None)
        if registry is None:
            return None
        if endpoint == "v2_infer":
            return registry.find(scope["path"].split("/")[3])
        return registry.find(model_named(body))

    def _authorized(self, scope: Scope) -> bool:
        # A request without a valid key gets its 401 from the route, never a hint of load.
        return key_accepted(scope.get("headers", []), self.state.settings.keys)

    async def _overloaded(
        self,
        send: Send,
        metrics: Metrics | None,
        scope: Scope,
        reason: str = "overloaded",
        retry: str = RETRY_AFTER_S,
    ) -> None:
        if metrics is not None:
            metrics.reject(reason, scope.get("model", ""))
        body = self.overloaded_body if reason == "overloaded" else self.late_body
        await send(
            {
                "type": "http.response.start",
                "status": self.overload_status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"retry-after", retry.encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    @staticmethod
    def _declared_length(scope: Scope) -> int | None:
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    return int(value)
                except ValueError:
                    return None
        return None

    async def _buffered(self, receive: Receive) -> tuple[Receive, bytes]:
        body = await read_body(receive, self.max_body_bytes)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay, body

    async def _too_large(self, send: Send, metrics: Metrics | None) -> None:
        if metrics is not None:
            metrics.reject("too_large")
        body = json.dumps(body_too_large(self.max_body_bytes)).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
