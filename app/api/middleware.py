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

from app.api.deps import authorized
from app.engine.errors import TooLate
from app.errors import ENGINE_ERRORS, RETRY_AFTER_S, error_body, retry_after
from app.metrics import Metrics

OVERLOADED = error_body("server overloaded; retry later", "overloaded")


class _BodyTooLarge(Exception):
    pass


def endpoint_of(path: str) -> str:
    if path == "/predict":
        return "predict"
    if path.startswith("/v2/models/") and path.endswith("/infer"):
        return "v2_infer"
    return "other"


class ServiceMiddleware:
    def __init__(
        self, app: ASGIApp, max_body_bytes: int, state: Any, overload_status: int = 429
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.state = state  # app.state: metrics and engine appear once the lifespan has run
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
            if endpoint != "other" and scope["method"] == "POST" and self._shed(scope):
                status["code"] = self.overload_status
                await self._overloaded(send, metrics)
                return
            declared = self._declared_length(scope)
            if declared is not None and declared > self.max_body_bytes:
                status["code"] = 413
                await self._too_large(send, metrics)
                return
            late = self._late(scope) if endpoint != "other" and scope["method"] == "POST" else None
            if late is not None or (
                declared is None and scope["method"] in ("POST", "PUT", "PATCH")
            ):
                # No Content-Length (chunked): read up to the limit here, where an excess
                # can still be answered 413, then hand the app the buffered body.
                try:
                    receive, body = await self._buffered(receive)
                except _BodyTooLarge:
                    status["code"] = 413
                    await self._too_large(send, metrics)
                    return
                if late is not None and b"timeout" not in body:
                    status["code"] = self.overload_status
                    await self._overloaded(send, metrics, "expected_wait", retry_after(late))
                    return
            await self.app(scope, receive, send_wrapper)
        finally:
            if metrics is not None:
                metrics.requests.labels(endpoint=endpoint, status=str(status["code"])).inc()
                metrics.request_duration.labels(endpoint=endpoint).observe(
                    time.perf_counter() - started
                )

    def _shed(self, scope: Scope) -> bool:
        engine = getattr(self.state, "engine", None)
        if engine is None or not engine.full:
            return False
        return self._authorized(scope)

    def _authorized(self, scope: Scope) -> bool:
        # A request without a valid key gets its 401 from the route, never a hint of load.
        header = next((v for k, v in scope.get("headers", ()) if k == b"authorization"), b"")
        return authorized(header.decode("latin-1"), self.state.settings.keys)

    def _late(self, scope: Scope) -> float | None:
        """Seconds one more input would be late at the target, for an authorized request."""
        engine = getattr(self.state, "engine", None)
        late = None if engine is None else engine.late_by(1)
        return late if late is not None and self._authorized(scope) else None

    async def _overloaded(
        self,
        send: Send,
        metrics: Metrics | None,
        reason: str = "overloaded",
        retry: str = RETRY_AFTER_S,
    ) -> None:
        if metrics is not None:
            metrics.rejected.labels(reason=reason).inc()
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
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                raise _BodyTooLarge
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
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
            metrics.rejected.labels(reason="too_large").inc()
        body = json.dumps(
            error_body(f"request body exceeds {self.max_body_bytes} bytes", "too_large")
        ).encode()
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
