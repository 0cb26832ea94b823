"""The benchmarks' own HTTP client and its two load shapes, against fake servers."""

from __future__ import annotations

import asyncio
import json
import os

import numpy as np
import pytest

from bench.client import (
    ProtocolError,
    build_request,
    closed_loop,
    cpu_seconds_from_stat,
    due_count,
    open_loop,
    parse_response,
    percentile,
    process_cpu_seconds,
)

OK = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nContent-Length: 13\r\n"
    b"x-total-time: 1.5\r\n\r\n"
    b'{"ok": "yes"}'
)


# -- HTTP response parsing -----------------------------------------------------------
def test_parse_complete_response() -> None:
    parsed = parse_response(OK)
    assert parsed is not None
    resp, used = parsed
    assert resp.status == 200
    assert resp.headers["content-length"] == "13"
    assert resp.headers["x-total-time"] == "1.5"  # names lower-cased, values stripped
    assert json.loads(resp.body) == {"ok": "yes"}
    assert used == len(OK)


@pytest.mark.parametrize("cut", [0, 10, OK.index(b"\r\n\r\n") + 2, len(OK) - 1])
def test_parse_incomplete_response_waits(cut: int) -> None:
    assert parse_response(OK[:cut]) is None
    assert parse_response(bytearray(OK[:cut])) is None


def test_parse_leaves_the_next_response_in_the_buffer() -> None:
    second = b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: 2\r\nRetry-After: 1\r\n\r\n{}"
    buf = bytearray(OK + second)
    parsed = parse_response(buf)
    assert parsed is not None
    first, used = parsed
    assert first.status == 200
    del buf[:used]
    parsed = parse_response(buf)
    assert parsed is not None
    assert parsed[0].status == 429 and parsed[0].body == b"{}" and parsed[1] == len(second)


def test_parse_bodyless() -> None:
    no_content = b"HTTP/1.1 204 No Content\r\nServer: x\r\n\r\n"
    parsed = parse_response(no_content)
    assert parsed is not None
    assert parsed[0].status == 204 and parsed[0].body == b"" and parsed[1] == len(no_content)


@pytest.mark.parametrize(
    "raw",
    [
        b"SPDY/3 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 abc OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nServer: y\r\n\r\n",  # no length
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nWiki\r\n0\r\n\r\n",
    ],
)
def test_parse_malformed_raises(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_response(raw)


def test_build_request_is_well_formed() -> None:
    body = json.dumps({"inputs": "très bien", "parameters": {}}, ensure_ascii=False).encode()
    req = build_request("127.0.0.1", "/predict", body)
    head, _, rest = req.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /predict HTTP/1.1"
    assert f"Content-Length: {len(body)}" in lines  # bytes, not characters
    assert rest == body


# -- /proc/<pid>/stat -------------------------------------------------------------------
def test_cpu_seconds_from_stat_handles_odd_command_names() -> None:
    # pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
    # utime stime ...
    line = "4242 (a (b) c) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 3 0 100 200 300"
    assert cpu_seconds_from_stat(line, 100) == pytest.approx(3.0)
    assert process_cpu_seconds(os.getpid()) > 0


# -- statistics ------------------------------------------------------------------------
def test_percentile_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 10, 101, 1000):
        x = rng.exponential(5.0, n).tolist()
        for q in (0, 1, 50, 95, 99, 99.9, 100):
            assert percentile(x, q) == pytest.approx(float(np.percentile(x, q)))


def test_percentile_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


@pytest.mark.parametrize(
    ("elapsed", "rate", "due"),
    [
        (-0.1, 10, 0),
        (0.0, 10, 1),
        (0.099, 10, 1),
        (0.1, 10, 2),
        (1.0, 10, 11),
        (2.5, 0.5, 2),
    ],
)
def test_due_count(elapsed: float, rate: float, due: int) -> None:
    assert due_count(elapsed, rate) == due


# -- the load shapes against a fake server ---------------------------------------------
async def _server(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: list[int]
) -> None:
    """Answers /healthz and POSTs: the request's number in the body; every 4th POST closes
    its connection without answering (a broken keep-alive connection)."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length"):
                    length = int(line.split(b":")[1])
            body = await reader.readexactly(length)
            if head.startswith(b"POST"):
                seen.append(int(json.loads(body)["k"]))
                if len(seen) % 4 == 0:
                    writer.close()
                    return
            out = body or b"{}"
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(out), out))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


def _load(shape: str, retry: bool = False) -> tuple[object, list[int]]:
    seen: list[int] = []
    requests = [build_request("127.0.0.1", "/x", json.dumps({"k": k}).encode()) for k in range(5)]

    async def main() -> object:
        server = await asyncio.start_server(lambda r, w: _server(r, w, seen), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            if shape == "open":
                return await open_loop(port, requests, 200.0, 0.3, 4, retry)
            return await closed_loop(port, requests, 3, 0.3)
        finally:
            server.close()

    return asyncio.run(main()), seen


@pytest.mark.parametrize("retry", [False, True])
def test_open_loop_offers_at_the_rate_and_records_every_reply(retry: bool) -> None:
    (replies, offered, took), seen = _load("open", retry)
    assert took >= 0.3 and 50 <= offered <= 0.3 * 200 + 10  # due at 200/s for 0.3 s
    assert len(replies) <= offered
    answered = [r for r in replies if r.response is not None]
    broken = [r for r in replies if r.response is None]
    for r in answered:  # each reply is the answer to its own request
        assert r.status == 200 and json.loads(r.response.body)["k"] == r.index
    assert all(0 <= r.index < 5 and r.latency_s >= 0 and r.delay_s >= 0 for r in replies)
    hung_up = len(seen) // 4  # every 4th POST the server reads, it hangs up on
    if retry:  # sent again on a new connection: a reply breaks only if both sends were hung up on
        assert len(seen) == len(replies) + hung_up - len(broken)
        assert 2 * len(broken) <= hung_up
    else:
        assert len(seen) == len(replies) and len(broken) == hung_up > 0


def test_closed_loop_counts_only_answers() -> None:
    rate, seen = _load("closed")
    assert 0 < rate * 0.3 <= len(seen) * 3 / 4 + 3
