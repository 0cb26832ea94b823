"""Start the real server in its own process on a free loopback port, for tests."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from bench.http_bench import exitserve_env, free_port

__all__ = ["ROOT", "ServerFailed", "free_port", "ready_process", "server_process"]

ROOT = Path(__file__).parents[1]


class ServerFailed(RuntimeError):
    pass


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
    url = f"http://127.0.0.1:{port}"
    with ready_process(cmd, url, log_path, env, timeout) as proc:
        yield url, proc


@contextmanager
def ready_process(
    cmd: list[str],
    url: str,
    log_path: Path,
    env: dict[str, str] | None = None,
    timeout: float = 120.0,
    cwd: Path = ROOT,
) -> Iterator[subprocess.Popen[bytes]]:
    """Runs `cmd` (from the repository root unless `cwd`) with its output in `log_path`;
    yields the process once `url`/readyz answers 200, and stops it after."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise ServerFailed(f"server exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise ServerFailed(f"server not ready in {timeout:.0f} s:\n{log_path.read_text()}")
            time.sleep(0.1)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
