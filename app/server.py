"""Run the app under uvicorn with a graceful drain on SIGTERM (and the first SIGINT).

uvicorn alone stops listening as soon as the signal arrives, so a load balancer that
still routes here sees refused connections and `/readyz` never gets to say 503. Here
the signal first puts every engine into draining: `/readyz` answers 503 at once, new
inference work is refused with a 503 JSON error, and everything already admitted
runs to its answer. Once every engine is idle (or `drain_timeout_s` has passed) uvicorn
shuts down as usual: it stops listening, finishes the responses in flight and runs
the lifespan's shutdown. A second signal skips the wait.
"""

from __future__ import annotations

import logging
import time
from types import FrameType
from typing import Any, Protocol

import uvicorn

from app.config import Settings

log = logging.getLogger("exitserve")

STARTUP_FAILED = 3  # uvicorn's own exit status when the app cannot start


class Drainable(Protocol):
    """What the drain asks of the models served (an engine registry, or the model
    processes behind a front end)."""

    idle: bool

    def begin_drain(self) -> None: ...

    def queued(self) -> int: ...


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: Any, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.app_state = state  # the app's `state`: `registry` appears there once loaded
        self.drain_timeout_s = drain_timeout_s
        self.drain_deadline: float | None = None  # monotonic; set by the first signal
        self._drain_logged = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        models: Drainable | None = getattr(self.app_state, "registry", None)
        if self.drain_deadline is not None or self.should_exit or models is None:
            super().handle_exit(sig, frame)  # a second signal, or nothing to drain yet
            return
        # A signal handler: set flags only; on_tick does the rest on the event loop.
        models.begin_drain()
        self.drain_deadline = time.monotonic() + self.drain_timeout_s

    async def on_tick(self, counter: int) -> bool:
        if self.drain_deadline is not None and not self.should_exit:
            models: Drainable = self.app_state.registry
            if not self._drain_logged:
                self._drain_logged = True
                log.info(
                    "draining: not ready, new work refused; %d inputs queued, up to %g s",
                    models.queued(),
                    self.drain_timeout_s,
                )
            left = self.drain_deadline - time.monotonic()
            if models.idle or left <= 0:
                log.info("drain %s; shutting down", "done" if models.idle else "timed out")
                # What is left of the budget goes to the responses still being written.
                self.config.timeout_graceful_shutdown = max(1, int(left))
                self.should_exit = True
        return await super().on_tick(counter)


def serve(app: Any, settings: Settings, uds: str | None = None, keep_alive_s: int = 5) -> int:
    """Serve until a signal and its drain end; the exit status (0, or 3 if never started).

    `app` is an ASGI app whose `state.registry` is drained; `uds`: listen on that Unix
    socket instead of the settings' host and port.
    """
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        uds=uds,
        log_level=settings.log_level,
        access_log=settings.access_log,
        timeout_keep_alive=keep_alive_s,
        # Behind a front end (a Unix socket), the front end writes these for the response.
        server_header=uds is None,
        date_header=uds is None,
        timeout_graceful_shutdown=max(1, int(settings.drain_timeout_s)),
    )
    server = DrainingServer(config, app.state, settings.drain_timeout_s)
    server.run()
    return 0 if server.started else STARTUP_FAILED
