"""A model's process: a one-model server on a Unix socket, forked by `zygote`.

The fork server imports this module once, and with it torch, ONNX Runtime and the
service, before it forks any model process: those pages are then shared by every model
process rather than held by each (copy on write).
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import threading
from typing import Any

# Imported here so that the fork server holds them once for every model process.
import onnx  # noqa: F401
import onnxruntime  # noqa: F401
import torch  # noqa: F401

from app.config import Settings
from app.main import create_app
from app.server import serve

# What is alive now is left out of every later collection, so that no model process's
# garbage collector writes to (and so copies) these pages.
gc.freeze()


def run(values: dict[str, Any], socket_path: str, life_fd: int) -> int:
    """Serve one model until SIGTERM and its drain end; the exit status as uvicorn's."""
    threading.Thread(target=_drain_when_closed, args=(life_fd,), daemon=True).start()
    form = f"%(levelname)s [{values['name']}] %(name)s: %(message)s"
    logging.basicConfig(level=values.get("log_level", "info").upper(), format=form)
    settings = Settings(**{k: v for k, v in values.items() if k != "name"})
    return serve(create_app(settings), settings, uds=socket_path, keep_alive_s=3600)


def _drain_when_closed(life_fd: int) -> None:
    """SIGTERM this process (a drain) once the front end is gone: the pipe's only write
    end was the front end's, so a read returns nothing when it dies."""
    while os.read(life_fd, 1):
        pass
    os.kill(os.getpid(), signal.SIGTERM)
