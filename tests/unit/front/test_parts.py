"""The front end's parts without model processes: the thread split, model names, the
merged exposition and the Unix-socket HTTP client."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.config import named_models
from app.front.expose import merged
from app.front.supervisor import threads_for
from app.front.upstream import Upstream, UpstreamError


@pytest.mark.parametrize(
    ("budget", "weights", "expected"),
    [
        (2, {}, {"a": 1, "b": 1}),
        (4, {"a": 3}, {"a": 3, "b": 1}),
        (3, {}, {"a": 2, "b": 1}),  # the remainder goes to the first of equals
        (1, {}, {"a": 1, "b": 1}),  # never below one thread
        (8, {"a": 1, "b": 0.5}, {"a": 5, "b": 3}),
    ],
)
def test_threads_are_split_by_weight(
    budget: int, weights: dict[str, float], expected: dict[str, int]
) -> None:
    assert threads_for(["a", "b"], budget, weights) == expected


def test_names_come_from_model_json_and_a_duplicate_is_refused(tmp_path: Path) -> None:
    for d, name in (("x", "one"), ("y", "two"), ("z", "one")):
        (tmp_path / d).mkdir()
        (tmp_path / d / "model.json").write_text(json.dumps({"name": name, "version": "3"}))
    assert named_models([tmp_path / "x", tmp_path / "y"]) == [
        ("one", "3", tmp_path / "x"),
        ("two", "3", tmp_path / "y"),
    ]
    with pytest.raises(ValueError, match=r"two models named 'one'.*'.*x'.*'.*z'"):
        named_models([tmp_path / "x", tmp_path / "z"])
    with pytest.raises(ValueError, match=r"'.*nowhere' does not load"):
        named_models([tmp_path / "nowhere"])


A = """# HELP exitserve_requests_total HTTP requests
# TYPE exitserve_requests_total counter
exitserve_requests_total{endpoint="predict",model="a",status="200"} 5.0
exitserve_requests_total{endpoint="other",model="",status="200"} 2.0
# HELP exitserve_ready 1 while the engine takes new work
# TYPE exitserve_ready gauge
exitserve_ready{model="a"} 1.0
# HELP exitserve_queue_duration_seconds Queue wait
# TYPE exitserve_queue_duration_seconds histogram
exitserve_queue_duration_seconds_bucket{le="0.1",model=""} 1.0
exitserve_queue_duration_seconds_bucket{le="+Inf",model=""} 2.0
exitserve_queue_duration_seconds_count{model=""} 2.0
exitserve_queue_duration_seconds_sum{model=""} 0.5
"""
B = A.replace('model="a"', 'model="b"').replace("5.0", "7.0")


def test_expositions_merge_into_one_family_each_summing_what_both_count() -> None:
    text = merged([A, B]).decode()
    assert text.count("# TYPE exitserve_requests_total counter") == 1
    series = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    predict = ("endpoint", "predict"), ("status", "200")
    assert series[("exitserve_requests_total", (*predict[:1], ("model", "a"), predict[1]))] == 5
    assert series[("exitserve_requests_total", (*predict[:1], ("model", "b"), predict[1]))] == 7
    other = (("endpoint", "other"), ("model", ""), ("status", "200"))
    assert series[("exitserve_requests_total", other)] == 4  # 2 + 2
    assert series[("exitserve_ready", (("model", "a"),))] == 1
    assert series[("exitserve_ready", (("model", "b"),))] == 1
    assert series[("exitserve_queue_duration_seconds_count", (("model", ""),))] == 4
    assert series[("exitserve_queue_duration_seconds_bucket", (("le", "+Inf"), ("model", "")))] == 4
    assert series[("exitserve_queue_duration_seconds_sum", (("model", ""),))] == 1.0


# -- Upstream, against a small server on a Unix socket ------------------------------------
async def _server(path: str, replies: list[bytes], seen: list[bytes]) -> asyncio.AbstractServer:
    """Answers each request it reads with the next of `replies`; an empty reply closes
    the connection without answering."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while replies:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":")[1]) for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            )  # fmt: skip
            seen.append(head + await reader.readexactly(length))
            reply = replies.pop(0)
            if not reply:
                writer.close()
                return
            writer.write(reply)
            await writer.drain()
        writer.close()

    return await asyncio.start_unix_server(handle, path)


def test_upstream_reads_sized_and_chunked_answers_on_one_connection(tmp_path: Path) -> None:
    async def main() -> None:
        seen: list[bytes] = []
        replies = [
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-a: 1\r\n\r\nok",
            b"HTTP/1.1 404 Not Found\r\ntransfer-encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        ]
        server = await _server(str(tmp_path / "s"), replies, seen)
        up = Upstream(str(tmp_path / "s"))
        headers = [(b"authorization", b"Bearer k"), (b"connection", b"keep-alive")]
        r = await up.request("POST", "/predict?x=1", headers, b'{"a":1}')
        assert (r.status, r.body, (b"x-a", b"1") in r.headers) == (200, b"ok", True)
        r = await up.request("GET", "/other")
        assert (r.status, r.body) == (404, b"abcde")
        assert seen[0].startswith(b"POST /predict?x=1 HTTP/1.1\r\n")
        assert b"authorization: Bearer k\r\n" in seen[0] and b"keep-alive" not in seen[0]
        assert seen[0].endswith(b'content-length: 7\r\n\r\n{"a":1}')
        assert len(up._idle) == 1  # both answers came over one kept-alive connection
        up.close()
        server.close()

    asyncio.run(main())


def test_upstream_retries_once_when_an_idle_connection_was_closed(tmp_path: Path) -> None:
    async def main() -> None:
        seen: list[bytes] = []
        ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
        server = await _server(str(tmp_path / "s"), [ok, b""], seen)
        up = Upstream(str(tmp_path / "s"))
        assert (await up.request("GET", "/a")).status == 200
        # The kept connection is closed on the next request, unanswered (as when a keep-alive
        # timeout ran out); the request goes once more, on a new connection (here to s2).
        server.close()
        server = await _server(str(tmp_path / "s2"), [ok], seen)
        up.path = str(tmp_path / "s2")
        assert (await up.request("GET", "/b")).status == 200
        server.close()
        up.close()

    asyncio.run(main())


def test_upstream_errors_name_an_absent_process(tmp_path: Path) -> None:
    async def main() -> None:
        with pytest.raises(UpstreamError, match="does not answer"):
            await Upstream(str(tmp_path / "missing")).request("GET", "/")

    asyncio.run(main())


def test_weights_must_name_configured_models(tmp_path: Path) -> None:
    from app.config import Settings
    from app.front.supervisor import Supervisor

    for d, name in (("x", "one"), ("y", "two")):
        (tmp_path / d).mkdir()
        (tmp_path / d / "model.json").write_text(json.dumps({"name": name}))
    dirs = f"{tmp_path / 'x'},{tmp_path / 'y'}"
    with pytest.raises(ValueError, match=r"names no configured model: \['three'\]"):
        Supervisor(Settings(model_dir=dirs, model_weights="one=2,three=1"))
