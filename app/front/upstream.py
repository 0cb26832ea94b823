"""HTTP/1.1 to a model process over its Unix socket, on kept-alive connections.

Only what the model processes send is read: a status line, headers, and a body sized by
Content-Length or sent in chunks. A connection is reused only after a whole response
was read from it; one the process closed while it sat idle is replaced once, and only
when nothing of the response had arrived (so the request never reached the handler).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

# Hop-by-hop headers: they describe one connection, not the request.
HOP = frozenset(
    b"connection keep-alive transfer-encoding upgrade host proxy-connection te trailer"
    b" content-length".split()
)
MAX_HEAD = 64 * 1024


class UpstreamError(Exception):
    """The model process could not be reached or sent no valid response."""


class Response:
    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body


class Upstream:
    def __init__(self, path: str, max_idle: int = 256) -> None:
        self.path = path
        self.max_idle = max_idle
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def request(
        self,
        method: str,
        target: str,
        headers: Iterable[tuple[bytes, bytes]] = (),
        body: bytes = b"",
    ) -> Response:
        head = [f"{method} {target} HTTP/1.1\r\nhost: model\r\n".encode()]
        head += [k + b": " + v + b"\r\n" for k, v in headers if k.lower() not in HOP]
        head.append(b"content-length: %d\r\n\r\n" % len(body))
        data = b"".join(head) + body
        for attempt in (0, 1):
            reused = bool(self._idle)
            reader, writer = self._idle.pop() if reused else await self._connect()
            try:
                writer.write(data)
                out, close = await self._read(reader)
            except _Stale:
                writer.close()
                if reused and attempt == 0:
                    continue  # closed while idle: the request never reached the handler
                raise UpstreamError("the model process closed the connection") from None
            except (OSError, asyncio.IncompleteReadError, ValueError) as e:
                writer.close()
                raise UpstreamError(f"the model process sent no valid response: {e}") from e
            except BaseException:
                writer.close()  # cancelled mid-response: the connection is out of step
                raise
            if close or len(self._idle) >= self.max_idle:
                writer.close()
            else:
                self._idle.append((reader, writer))
            return out
        raise AssertionError("unreachable")

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            return await asyncio.open_unix_connection(self.path, limit=MAX_HEAD)
        except OSError as e:
            raise UpstreamError(f"the model process does not answer: {e}") from e

    async def _read(self, reader: asyncio.StreamReader) -> tuple[Response, bool]:
        try:
            raw = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as e:
            if not e.partial:
                raise _Stale from None
            raise
        lines = raw[:-4].split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise ValueError("not an HTTP/1.x status line")
        status = int(parts[1])
        headers, length, chunked, close = [], None, False, False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                close = b"close" in value.lower()
            if name not in HOP:
                headers.append((name, value))
        if chunked:
            body = await _chunks(reader)
        elif length is not None:
            body = await reader.readexactly(length)
        else:
            body, close = await reader.read(), True  # until the process closes it
        return Response(status, headers, body), close

    def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()


class _Stale(Exception):
    pass


async def _chunks(reader: asyncio.StreamReader) -> bytes:
    out: list[bytes] = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")  # no trailers are sent
            return b"".join(out)
        out.append(await reader.readexactly(size))
        await reader.readexactly(2)
