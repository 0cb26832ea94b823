"""The front end: one port for every model, each request passed to its model's process.

A plain ASGI app, not FastAPI: per request it reads the body, finds the model (the
`model` of a /predict body, the name in a /v2/models/ path; otherwise the default
model) and copies the bytes both ways over the model process's Unix socket, whose own
server validates, authorizes, admits, counts and answers. What concerns the server as
a whole is answered here: the repository index and model control, health and
readiness, /info and /metrics gathered from every model process, and the refusals no
model process can give (an unknown or unloaded model, a body over the limit).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from starlette.types import Receive, Scope, Send

from app import __version__
from app.config import Settings
from app.front.expose import merged
from app.front.supervisor import READY, UNLOADING, LoadFailed, ModelProcess, Supervisor
from app.front.upstream import Upstream, UpstreamError
from app.http import (
    BodyTooLarge,
    body_too_large,
    clip,
    endpoint_of,
    error_body,
    key_accepted,
    model_named,
    read_body,
    server_metadata,
    unknown_model,
)
from app.metrics import LATENCY_BUCKETS

log = logging.getLogger("exitserve")

Headers = list[tuple[bytes, bytes]]
JSON: Headers = [(b"content-type", b"application/json")]
METRICS_TYPE = CONTENT_TYPE_LATEST.encode()  # what a model process's /metrics says
NOT_READY = error_body("not ready", "unavailable")


class Router:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.models = Supervisor(settings)
        self.state = SimpleNamespace()  # `registry` once every model serves (app.server)
        self._metrics = CollectorRegistry()
        # Requests answered here, never seen by a model process; summed with theirs.
        labels = ["endpoint", "status", "model"]
        self._requests = Counter(
            "exitserve_requests", "HTTP requests", labels, registry=self._metrics
        )
        # A forwarded request's time here, body read to answer sent: the model process's
        # exitserve_request_duration_seconds plus the hop to it and back.
        self._duration = Histogram(
            "exitserve_front_request_duration_seconds",
            "Request time at the front end, the hop to the model's process included",
            ["endpoint", "model"],
            buckets=LATENCY_BUCKETS,
            registry=self._metrics,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    # -- routing --------------------------------------------------------------------------
    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        path = scope["path"]
        try:
            body = await read_body(receive, self.settings.max_body_bytes)
        except BodyTooLarge:
            message = body_too_large(self.settings.max_body_bytes)
            await self._answer(send, 413, message, [(b"connection", b"close")], scope)
            return
        if path == "/predict":
            name = model_named(body) if scope["method"] == "POST" else None
            await self._forward(scope, send, body, name, started)
        elif path.startswith("/v2/models/"):
            await self._forward(scope, send, body, path.split("/")[3], started)
        elif path.startswith("/v2/repository/"):
            await self._repository(scope, send, body)
        elif path == "/metrics":
            await self._send(send, 200, await self._exposition(), [(b"content-type", METRICS_TYPE)])
        elif path == "/info":
            await self._info(scope, send)
        elif path == "/v2":
            await self._answer(send, 200, server_metadata())
        elif path in ("/healthz", "/v2/health/live"):
            await self._live(send, path)
        elif path in ("/readyz", "/v2/health/ready"):
            await self._ready(send, path)
        else:
            await self._forward(
                scope, send, body, None, started
            )  # the default model's server answers

    async def _forward(
        self, scope: Scope, send: Send, body: bytes, name: str | None, started: float
    ) -> None:
        m = self.models.models.get(self.models.default if name is None else name)
        running = m is not None and m.process is not None and m.state in (READY, UNLOADING)
        if not running and await self._refused_key(scope, send):
            return  # no model's server to check the key: a request without one learns nothing
        if m is None:
            await self._answer(send, 404, unknown_model(name, self.models.names), scope=scope)
            return
        if not running:
            await self._not_running(send, m, scope)
            return
        target = scope.get("raw_path") or scope["path"].encode()
        if scope.get("query_string"):
            target += b"?" + scope["query_string"]
        try:
            r = await m.upstream.request(
                scope["method"], target.decode("latin-1"), scope["headers"], body
            )
        except UpstreamError as e:
            log.warning("model %s: %s", m.name, e)
            await self._not_running(send, m, scope)
            return
        await self._send(send, r.status, r.body, r.headers)
        took = time.perf_counter() - started
        self._duration.labels(endpoint_of(scope["path"]), m.name).observe(took)

    async def _not_running(self, send: Send, m: ModelProcess, scope: Scope) -> None:
        message = error_body(f"model {m.name!r} is not loaded ({m.state.lower()})", "unavailable")
        await self._answer(send, 503, message, [(b"retry-after", b"1")], scope)

    # -- the repository extension ---------------------------------------------------------
    async def _refused_key(self, scope: Scope, send: Send) -> bool:
        """Answers 401 (and says so) when keys are configured and the request has none of them."""
        if key_accepted(scope["headers"], self.settings.keys):
            return False
        message = error_body("missing or invalid API key", "unauthorized")
        await self._answer(send, 401, message, [(b"www-authenticate", b"Bearer")], scope)
        return True

    async def _repository(self, scope: Scope, send: Send, body: bytes) -> None:
        if await self._refused_key(scope, send):
            return
        parts = scope["path"].split("/")  # "", "v2", "repository", ...
        if scope["method"] != "POST":
            await self._answer(send, 405, error_body("Method Not Allowed", "method_not_allowed"))
        elif parts[3:] == ["index"]:
            await self._index(send, body)
        elif len(parts) == 6 and parts[3] == "models" and parts[5] in ("load", "unload"):
            await self._control(send, parts[4], parts[5])
        else:
            await self._answer(send, 404, error_body("Not Found", "not_found"))

    async def _index(self, send: Send, body: bytes) -> None:
        try:
            asked = json.loads(body) if body.strip() else {}
        except (ValueError, RecursionError):
            asked = None
        if not isinstance(asked, dict) or not isinstance(asked.get("ready", False), bool):
            message = error_body('body: expected {"ready": true|false}', "validation")
            await self._answer(send, 422, message)
            return
        models = self.models.index()
        if asked.get("ready"):
            models = [m for m in models if m["state"] == READY]
        await self._answer(send, 200, models)

    async def _control(self, send: Send, name: str, action: str) -> None:
        if self.settings.model_control != "explicit":
            message = "model control is not explicit (EXITSERVE_MODEL_CONTROL=explicit)"
            await self._answer(send, 400, error_body(message, "unsupported"))
            return
        if name not in self.models.models:
            await self._answer(send, 404, unknown_model(name, self.models.names))
            return
        if action == "unload":
            await self.models.stop(name)
        else:
            try:
                await self.models.start(name)
            except LoadFailed as e:
                log.error("%s", e)
                failed = f"failed to load model {clip(name)!r}; see the server log"
                await self._answer(send, 400, error_body(failed, "load_failed"))
                return
        await self._answer(send, 200, {})

    # -- the server as a whole ------------------------------------------------------------
    async def _live(self, send: Send, path: str) -> None:
        if self.models.failed:
            await self._answer(send, 503, error_body("a model's process exited", "unavailable"))
        else:
            await self._answer(
                send, 200, {"status": "ok"} if path == "/healthz" else {"live": True}
            )

    async def _ready(self, send: Send, path: str) -> None:
        """Ready while every loaded model's server is (an unloaded one is not waited for)."""
        running = self.models.running()
        why = "draining" if self.models.draining else "" if running else "no model loaded"
        if not why:
            answers = await asyncio.gather(*(self._get(m, "/readyz") for m in running))
            for m, (status, answer) in zip(running, answers, strict=True):
                if status != 200:
                    why = f"{m.name}: {answer.get('error', 'not ready') if answer else 'not ready'}"
                    break
        if path == "/v2/health/ready":
            await self._answer(send, 503 if why else 200, NOT_READY if why else {"ready": True})
        elif why:
            await self._answer(send, 503, error_body(why, "unavailable"))
        else:
            await self._answer(send, 200, {"status": "ready"})

    async def _info(self, scope: Scope, send: Send) -> None:
        """The default model's figures, every model's own (each from its process), and
        how they share the cores."""
        running = self.models.running()
        answers = await asyncio.gather(*(self._get(m, "/info") for m in running))
        infos = {m.name: a for m, (s, a) in zip(running, answers, strict=True) if s == 200}
        default = infos.get(self.models.default)
        if default is None:
            await self._not_running(send, self.models.models[self.models.default], scope)
            return
        models = []
        for entry in self.models.index():
            own = infos.get(entry["name"])
            described = (
                own["models"][0]
                if own and own.get("models")
                else {"model": entry["name"], "model_version": entry["version"]}
            )
            models.append({**described, "state": entry["state"], "reason": entry["reason"]})
        shares = {
            "policy": "a process per model; threads split by weight",
            "threads": {m.name: m.threads for m in self.models.models.values()},
            "weights": {n: self.settings.weights.get(n, 1.0) for n in self.models.names},
        }
        await self._answer(
            send, 200, {**default, "version": __version__, "models": models, "shares": shares}
        )

    async def _exposition(self) -> bytes:
        running = self.models.running()
        texts = await asyncio.gather(*(self._text(m.upstream, "/metrics") for m in running))
        own = generate_latest(self._metrics).decode()
        return merged([*(t for t in texts if t), own])

    # -- plumbing -------------------------------------------------------------------------
    async def _get(self, m: ModelProcess, path: str) -> tuple[int, Any]:
        try:
            r = await m.upstream.request("GET", path)
            return r.status, json.loads(r.body)
        except (UpstreamError, ValueError):
            return 0, None

    async def _text(self, upstream: Upstream, path: str) -> str:
        try:
            r = await upstream.request("GET", path)
        except UpstreamError:
            return ""
        return r.body.decode() if r.status == 200 else ""

    async def _answer(
        self,
        send: Send,
        status: int,
        content: Any,
        headers: Sequence[tuple[bytes, bytes]] = (),
        scope: Scope | None = None,
    ) -> None:
        if scope is not None:  # a refusal of a request meant for a model: counted here
            self._requests.labels(endpoint_of(scope["path"]), str(status), "").inc()
        await self._send(send, status, json.dumps(content).encode(), [*JSON, *headers])

    @staticmethod
    async def _send(send: Send, status: int, body: bytes, headers: Headers) -> None:
        head = [*headers, (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": head})
        await send({"type": "http.response.body", "body": body})

    # -- start and stop -------------------------------------------------------------------
    async def _lifespan(self, receive: Receive, send: Send) -> None:
        watch: asyncio.Task[None] | None = None
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                started = time.monotonic()
                try:
                    await self.models.start_all()
                except Exception as e:
                    log.error("cannot serve the models in %s: %s", self.settings.model_dir, e)
                    await send({"type": "lifespan.startup.failed", "message": str(e)})
                    return
                log.info(
                    "%d models serving in %.1f s: %s",
                    len(self.models.names),
                    time.monotonic() - started,
                    ", ".join(self.models.names),
                )
                watch = asyncio.create_task(self.models.watch())
                self.state.registry = self.models
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if watch is not None:
                    watch.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await watch
                await self.models.stop_all()
                await send({"type": "lifespan.shutdown.complete"})
                return
