"""The model processes behind a front end: started, watched, drained and stopped.

Each configured model gets a process of its own (`child.run`), forked by a fork server
(`zygote`) that imported torch, ONNX Runtime and the service once and exits once they
are started; this process is their child subreaper, so they become its children then.
Each listens on a Unix socket in a private directory and runs `threads_for(...)` torch
threads: the thread budget split by `MODEL_WEIGHTS` (largest remainders; at least one
each). States follow Triton's repository extension, as `app.engine.registry` does in
one process.

Stopping a model is its own drain: SIGTERM makes its server refuse new work (503) and
answer everything it admitted, within `DRAIN_TIMEOUT_S`, before it exits; past that
and a grace period it is killed. A model process that exits on its own fails the
server's liveness (a restart is the cure, as for a dead engine worker).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.config import Settings, named_models
from app.front.upstream import Upstream, UpstreamError

log = logging.getLogger("exitserve")

READY, LOADING, UNLOADING, UNAVAILABLE = "READY", "LOADING", "UNLOADING", "UNAVAILABLE"
KILL_GRACE_S = 5.0
PR_SET_CHILD_SUBREAPER = 36


class LoadFailed(Exception):
    pass


class Child:
    """A model process, by pid: it is the fork server's child until that exits, then
    this process's (the subreaper), which collects its exit status."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.exitcode: int | None = None

    def alive(self) -> bool:
        if self.exitcode is not None:
            return False
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:  # not ours (yet): the fork server reaps it
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                self.exitcode = -1  # gone; its status went to the fork server
                return False
            return True
        if pid == 0:
            return True
        self.exitcode = os.waitstatus_to_exitcode(status)
        return False

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)


@dataclass
class ModelProcess:
    name: str
    model_dir: Path
    version: str
    threads: int
    socket: str
    upstream: Upstream
    state: str = UNAVAILABLE
    reason: str = ""
    process: Child | None = None
    stopping: bool = False


def threads_for(names: Sequence[str], budget: int, weights: Mapping[str, float]) -> dict[str, int]:
    """The thread budget split by weight (a model not named weighs 1): largest
    remainders, every model at least one thread."""
    w = {n: weights.get(n, 1.0) for n in names}
    total = sum(w.values())
    exact = {n: budget * w[n] / total for n in names}
    out = {n: max(1, math.floor(exact[n])) for n in names}
    left = budget - sum(out.values())
    for n in sorted(names, key=lambda n: (math.floor(exact[n]) - exact[n], names.index(n))):
        if left <= 0:
            break
        out[n] += 1
        left -= 1
    return out


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        found = named_models(settings.model_dirs)
        self.names = [name for name, _, _ in found]
        self.default = self.names[0]
        unknown = sorted(set(settings.weights) - set(self.names))
        if unknown:
            raise ValueError(f"EXITSERVE_MODEL_WEIGHTS names no configured model: {unknown}")
        budget = threads_for(self.names, settings.threads, settings.weights)
        self._dir = tempfile.mkdtemp(prefix="exitserve-")
        self.models: dict[str, ModelProcess] = {}
        for i, (name, version, d) in enumerate(found):
            sock = f"{self._dir}/{i}.sock"
            self.models[name] = ModelProcess(name, d, version, budget[name], sock, Upstream(sock))
        self.draining = False
        self.failed = False
        self._locks = {name: asyncio.Lock() for name in self.names}
        # The pipe whose closing tells the model processes this one died.
        self._life_r, self._life_w = os.pipe()
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1)

    def values(self, m: ModelProcess) -> dict[str, Any]:
        """The model process's settings: this server's, for its one model and threads."""
        v = self.settings.model_dump()
        v["api_keys"] = self.settings.api_keys.get_secret_value()
        # One model, its share of the threads; the weights were this server's to apply.
        v.update(model_dir=str(m.model_dir), threads=m.threads, name=m.name, model_weights="")
        if v["workers"] is not None:
            v["workers"] = min(v["workers"], m.threads)
        return v

    # -- one model ------------------------------------------------------------------------
    async def start(self, name: str) -> None:
        """Start `name`'s process and wait until it is ready (already running: nothing)."""
        await self.start_many([name])

    async def start_many(self, names: Sequence[str]) -> None:
        """Start the processes of `names` (those not running) from one fork server, and
        wait until each is ready; the first failure is raised once all are settled."""
        locks = [self._locks[n] for n in names]
        async with contextlib.AsyncExitStack() as held:
            for lock in locks:
                await held.enter_async_context(lock)
            todo = [self.models[n] for n in names if self.models[n].process is None]
            if not todo:
                return
            for m in todo:
                m.state, m.reason, m.stopping = LOADING, "", False
                Path(m.socket).unlink(missing_ok=True)
            commands = [{"values": self.values(m), "socket": m.socket} for m in todo]
            deadline = time.monotonic() + self.settings.load_timeout_s
            try:
                pids = await asyncio.to_thread(self._fork, commands)
            except LoadFailed:
                for m in todo:
                    m.state, m.reason = UNAVAILABLE, "load failed; see the server log"
                raise
            for m, pid in zip(todo, pids, strict=True):
                m.process = Child(pid)
                log.info("model %s: process %d started (%d threads)", m.name, pid, m.threads)
            failures = [
                r
                for r in await asyncio.gather(
                    *(self._until_ready(m, deadline) for m in todo), return_exceptions=True
                )
                if isinstance(r, BaseException)
            ]
            if failures:
                raise failures[0]

    async def _until_ready(self, m: ModelProcess, deadline: float) -> None:
        """Wait for `m`'s process to answer /readyz 200; one that exits first, or is not
        seen ready by `deadline` (`load_timeout_s` from the start of the load, the fork
        server's imports included), fails the load, killed."""
        p = m.process
        assert p is not None
        while True:
            if not p.alive():
                m.process, m.state = None, UNAVAILABLE
                m.reason = "load failed; see the server log"
                code = p.exitcode
                raise LoadFailed(f"model {m.name!r}: its process exited ({code}) before ready")
            if time.monotonic() > deadline:
                limit = self.settings.load_timeout_s
                p.signal(signal.SIGKILL)
                gone = time.monotonic() + KILL_GRACE_S
                while p.alive() and time.monotonic() < gone:
                    await asyncio.sleep(0.02)
                m.process, m.state = None, UNAVAILABLE
                m.reason = f"not ready within LOAD_TIMEOUT_S ({limit:g} s)"
                raise LoadFailed(f"model {m.name!r}: {m.reason}; its process was killed")
            try:  # a process that takes the connection but never answers is not ready
                left = max(deadline - time.monotonic(), 0.05)
                if await asyncio.wait_for(self._ready(m), left):
                    break
            except TimeoutError:
                pass
            await asyncio.sleep(0.05)
        m.state = READY

    def _fork(self, commands: list[dict[str, Any]]) -> list[int]:
        """Start a fork server, have it fork a model process per command, and let it
        exit; the pids, in order."""
        cmd_r, cmd_w = os.pipe()
        reply_r, reply_w = os.pipe()
        fds = (cmd_r, reply_w, self._life_r)
        argv = [sys.executable, "-m", "app.front.zygote", *(str(fd) for fd in fds)]
        try:
            server = subprocess.Popen(argv, pass_fds=fds)
        finally:
            os.close(cmd_r)
            os.close(reply_w)
        pids: list[int] = []
        with os.fdopen(cmd_w, "wb", buffering=0) as cmd, os.fdopen(reply_r, "rb") as reply:
            if reply.readline() != b"ready\n":
                server.wait()
                raise LoadFailed(f"the fork server exited ({server.returncode}); see the log")
            for command in commands:
                cmd.write(json.dumps(command).encode() + b"\n")
                line = reply.readline()
                if not line:
                    raise LoadFailed("the fork server exited while forking; see the log")
                pids.append(int(line))
        server.wait()  # its command pipe closed: it exits, the model processes stay
        return pids

    async def stop(self, name: str, timeout_s: float | None = None) -> bool:
        """Drain `name` and stop its process; whether it exited within the drain."""
        m = self.models[name]
        timeout_s = self.settings.drain_timeout_s if timeout_s is None else timeout_s
        async with self._locks[name]:
            p = m.process
            if p is None:
                return True
            m.state, m.stopping = UNLOADING, True
            p.signal(signal.SIGTERM)  # the model's server drains, then exits
            deadline = time.monotonic() + timeout_s + KILL_GRACE_S
            while p.alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            drained = not p.alive()
            if not drained:
                log.error("model %s: still running %.0f s after SIGTERM; killed", name, timeout_s)
                p.signal(signal.SIGKILL)
                while p.alive() and time.monotonic() < deadline + KILL_GRACE_S:
                    await asyncio.sleep(0.02)
            m.upstream.close()
            m.process, m.state, m.reason = None, UNAVAILABLE, "unloaded"
            log.info("model %s: stopped (%s)", name, "drained" if drained else "killed")
            return drained

    async def _ready(self, m: ModelProcess) -> bool:
        try:
            r = await m.upstream.request("GET", "/readyz")
        except UpstreamError:
            return False
        return r.status == 200

    # -- all of them ----------------------------------------------------------------------
    async def start_all(self) -> None:
        try:
            await self.start_many(self.names)
        except BaseException:
            await self.stop_all(0.0)
            raise

    async def stop_all(self, timeout_s: float | None = None) -> None:
        await asyncio.gather(*(self.stop(n, timeout_s) for n in self.names))
        shutil.rmtree(self._dir, ignore_errors=True)

    async def watch(self, every_s: float = 0.5) -> None:
        """Notice a model process that exited on its own: the model turns UNAVAILABLE
        and the server's liveness fails."""
        while True:
            await asyncio.sleep(every_s)
            for m in self.models.values():
                p = m.process
                if p is not None and not m.stopping and not p.alive():
                    log.error("model %s: its process exited (%s)", m.name, p.exitcode)
                    m.state, m.reason = UNAVAILABLE, "the model's process exited"
                    m.process = None
                    self.failed = True

    def running(self) -> list[ModelProcess]:
        return [m for m in self.models.values() if m.process is not None]

    def index(self) -> list[dict[str, str]]:
        return [
            {"name": m.name, "version": m.version, "state": m.state, "reason": m.reason}
            for m in self.models.values()
        ]

    # -- the drain on SIGTERM (app.server.Drainable) ----------------------------------------
    def begin_drain(self) -> None:
        """Every model process starts its own drain (called from a signal handler)."""
        self.draining = True
        for m in self.running():
            m.stopping = True
            if m.process is not None:
                m.process.signal(signal.SIGTERM)

    def queued(self) -> int:
        return 0  # each model process logs its own

    @property
    def idle(self) -> bool:
        return all(m.process is None or not m.process.alive() for m in self.models.values())
