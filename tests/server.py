"""Start the real server in its own process on a free loopback port, for tests
(`devtools.server_process` holds what tests and benchmarks share)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from devtools.server_process import exitserve_env, free_port, running_command

__all__ = ["ROOT", "free_port", "running_command", "server_process"]

ROOT = Path(__file__).parents[1]


@contextmanager
def server_process(
    settings: dict[str, str], log_path: Path, entry: str = "cli", timeout: float = 120.0
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Yields (base URL, process) once /readyz answers 200; stops the process after.

    entry "cli" runs `exitserve serve`; "uvicorn" runs `uvicorn app.main:app`.
    `settings` are EXITSERVE_* values without the prefix; the caller's own are dropped.
    """
    port = free_port()
    env = exitserve_env(port, dict(settings))
    env["PYTHONUNBUFFERED"] = "1"
    if entry == "uvicorn":
        cmd = [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1",
               "--port", str(port), "--log-level", "warning"]  # fmt: skip
    else:
        cmd = [sys.executable, "-m", "app.cli", "serve"]
    with running_command(cmd, env, port, timeout, log_path) as proc:
        yield f"http://127.0.0.1:{port}", proc
