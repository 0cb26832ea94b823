"""Start a real exitserve server in its own process on a free loopback port, wait for it
to be ready, and stop it: what the end-to-end tests and the benchmarks both need.

Not a benchmark and not part of the service: a small helper the way vLLM's tests keep
`RemoteOpenAIServer`.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def exitserve_env(port: int, settings: dict[str, object]) -> dict[str, str]:
    """This process's environment without its own EXITSERVE_* values, plus `settings`
    (names without the prefix) and a loopback address on `port`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXITSERVE_")}
    settings = {**settings, "host": "127.0.0.1", "port": port}
    env.update({f"EXITSERVE_{k.upper()}": str(v) for k, v in settings.items()})
    return env


@contextmanager
def running_command(
    argv: Sequence[str],
    env: dict[str, str],
    port: int,
    startup_timeout: float = 300.0,
    log_path: Path | None = None,
    cwd: Path = ROOT,
) -> Iterator[subprocess.Popen[bytes]]:
    """A server process started from `argv` (in `cwd`), once `GET /readyz` on `port`
    answers 200; always terminated (SIGTERM, then SIGKILL) on exit. Its output goes to
    `log_path` when given (for the caller to read), else to a temporary file."""
    with open(log_path, "w+b") if log_path else tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)

        def log_tail() -> str:
            log.seek(0)
            return log.read().decode("utf-8", "replace")[-3000:]

        try:
            deadline = time.monotonic() + startup_timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited early ({proc.returncode}):\n{log_tail()}")
                try:
                    if http_get(port, "/readyz", 2.0)[0] == 200:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server not ready in {startup_timeout:g} s:\n{log_tail()}")
                time.sleep(0.2)
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)


@contextmanager
def exitserve_server(
    env_for_port: Callable[[int], dict[str, str]], startup_timeout: float
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """The real exitserve server on a free loopback port with the environment made for
    that port, ready; SIGTERM on leaving, after which `returncode` is its exit status."""
    port = free_port()
    argv = [sys.executable, "-m", "app.cli", "serve"]
    with running_command(argv, env_for_port(port), port, startup_timeout) as proc:
        yield proc, port
