"""The benchmarks' HTTP/1.1 keep-alive client and the two load shapes they offer.

Kept by hand because it shares the CPUs with the server it measures: against the real
server at 16 connections it cost 0.05-0.07 ms of client CPU per request, httpx's async
client 1.0-1.1 ms, which on 2 cores cut the requests served from about 2,000/s to about
750/s (`bench/client_cost.py`; figures in docs/decisions.md). It speaks only what the
servers it drives answer: Content-Length bodies (a chunked answer is a ProtocolError).

Closed loop: C clients, each sending its next request the moment the last is answered
(saturation throughput). Open loop: requests due at a fixed rate, each sent by the next
free connection, so a slow server meets more load, not less (latency under overload).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Coroutine, Sequence
from typing import Any, NamedTuple, TypeVar

T = TypeVar("T")
HOST = "127.0.0.1"
BROKEN = (OSError, asyncio.IncompleteReadError)


class ProtocolError(ValueError):
    """The bytes the server sent are not an HTTP/1.1 response this client understands."""


class Response(NamedTuple):
    status: int
    headers: dict[str, str]  # names lower-cased
    body: bytes


class Reply(NamedTuple):
    """One request of an open loop: which, its answer (None: the connection broke), the
    seconds from sending to the answer and from its due time to sending."""

    index: int
    response: Response | None
    latency_s: float
    delay_s: float

    @property
    def status(self) -> int:
        return 0 if self.response is None else self.response.status


def build_request(host: str, path: str, body: bytes) -> bytes:
    """A keep-alive HTTP/1.1 POST of a JSON body."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("ascii") + body


def parse_response(buf: bytes | bytearray) -> tuple[Response, int] | None:
    """One response from the front of `buf`: (response, bytes consumed), or None while it
    is incomplete; bytes after it (a pipelined next response) stay for the next call."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ProtocolError(f"bad status line {lines[0]!r}")
    status, headers = int(parts[1]), {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise ProtocolError(f"bad header line {line!r}")
        headers[name.strip().lower()] = value.strip()
    start = end + 4
    if status < 200 or status in (204, 304):
        return Response(status, headers, b""), start
    try:
        length = int(headers["content-length"])
    except (KeyError, ValueError) as e:
        raise ProtocolError(f"no usable Content-Length in {sorted(headers)}") from e
    if len(buf) < start + length:
        return None
    return Response(status, headers, bytes(buf[start : start + length])), start + length


class Connection:
    """One keep-alive HTTP/1.1 connection; reopened after an error or `Connection: close`."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._buf = bytearray()

    async def roundtrip(self, request: bytes) -> Response:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
            self._buf.clear()
        assert self._reader is not None
        self._writer.write(request)
        await self._writer.drain()
        while (parsed := parse_response(self._buf)) is None:
            data = await self._reader.read(65536)
            if not data:
                raise ConnectionError("server closed the connection")
            self._buf += data
        response, used = parsed
        del self._buf[:used]
        if response.headers.get("connection", "").lower() == "close":
            self.close()
        return response

    async def send(self, request: bytes, retry: bool = False) -> Response | None:
        """The answer, or None (connection closed) if the connection broke. With `retry`,
        once more on a new connection first: a server closes a keep-alive connection left
        idle past its timeout (uvicorn: 5 s), as at a low rate over many connections."""
        for _ in range(2 if retry else 1):
            try:
                return await self.roundtrip(request)
            except (*BROKEN, ProtocolError):
                self.close()
        return None

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None
        self._buf.clear()


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def cpu_seconds_from_stat(stat: str, clock_ticks: int) -> float:
    """utime + stime (all threads) from a /proc/<pid>/stat line, in seconds."""
    # Field 2, the command name, is in parentheses and may hold spaces and ')'.
    fields = stat.rpartition(")")[2].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / clock_ticks


def process_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
        return cpu_seconds_from_stat(f.read(), os.sysconf("SC_CLK_TCK"))


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop where it is installed (a cheaper client), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def due_count(elapsed_s: float, rate: float) -> int:
    """Requests due by `elapsed_s` at a steady `rate` per second (the first at 0)."""
    return int(elapsed_s * rate) + 1 if elapsed_s >= 0 else 0


HEALTH = f"GET /healthz HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()


async def connect(port: int, n: int, at_once: int = 32) -> list[Connection]:
    """`n` open keep-alive connections, opened a few at a time before the clock starts:
    hundreds of simultaneous SYNs overflow the listen queue, and the retries (1 s, 2 s)
    would be measured as latency."""
    conns = [Connection(HOST, port) for _ in range(n)]
    gate = asyncio.Semaphore(at_once)

    async def open_one(c: Connection) -> None:
        async with gate:
            r = await c.send(HEALTH)
            if r is None or r.status != 200:
                raise RuntimeError(f"could not open a connection to the server ({r})")

    await asyncio.gather(*(open_one(c) for c in conns))
    return conns


async def closed_loop(
    port: int, requests: Sequence[bytes], connections: int, seconds: float
) -> float:
    """Answered requests per second with `connections` clients sending back to back."""
    answered = 0
    stop = time.perf_counter() + seconds

    async def client(i: int) -> None:
        nonlocal answered
        conn, k = Connection(HOST, port), i
        try:
            while time.perf_counter() < stop:
                r = await conn.send(requests[k % len(requests)])
                answered += r is not None and r.status == 200
                k += connections
        finally:
            conn.close()

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(connections)))
    return answered / (time.perf_counter() - started)


async def open_loop(
    port: int,
    requests: Sequence[bytes],
    rate: float,
    seconds: float,
    connections: int,
    retry: bool = False,
) -> tuple[list[Reply], int, float]:
    """Offer `rate` requests/s for `seconds`, each due at its own time: (replies, offered,
    seconds taken). A request is offered when due and sent by the next free connection;
    one that finds every connection busy and one already waiting is not sent at all (the
    client, not the server, was the limit: compare the sent rate with the offered)."""
    tickets: asyncio.Queue[tuple[int, float] | None] = asyncio.Queue()
    replies: list[Reply] = []
    conns = await connect(port, connections)

    async def worker(conn: Connection) -> None:
        try:
            while (ticket := await tickets.get()) is not None:
                k, due = ticket
                sent = time.perf_counter()
                response = await conn.send(requests[k % len(requests)], retry)
                took = time.perf_counter() - sent
                replies.append(Reply(k % len(requests), response, took, max(0.0, sent - due)))
        finally:
            conn.close()

    workers = [asyncio.ensure_future(worker(c)) for c in conns]
    start, offered = time.perf_counter(), 0
    try:
        while (elapsed := time.perf_counter() - start) < seconds:
            for k in range(offered, due_count(elapsed, rate)):
                if tickets.qsize() < connections:
                    tickets.put_nowait((k, start + k / rate))
                offered += 1
            await asyncio.sleep(0.001)
        took = time.perf_counter() - start
        for _ in workers:
            tickets.put_nowait(None)
        await asyncio.wait_for(asyncio.gather(*workers), timeout=120)
    finally:
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    return replies, offered, took
