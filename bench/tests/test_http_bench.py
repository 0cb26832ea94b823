"""bench/http_bench.py: HTTP parsing, statistics, aggregation, ratios, the client loop
against a fake server, and (slow) the whole harness against a tiny model."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from bench.client import Connection, build_request
from bench.http_bench import (
    Options,
    Sample,
    Window,
    _http_worker,
    _State,
    aggregate,
    compute_ratios,
    correctness_by_text,
    exit_metric_lines,
    markdown,
    paired_accuracy_difference,
    run,
    run_window,
)
from tests.tiny import make_tiny_model_with_data


def _window(config: str, c: int, seconds: float, samples: list[Sample], cpu: float = 0.5) -> Window:
    return Window(config, c, 0, seconds, cpu, 0.1, samples)


def test_aggregate_pools_windows() -> None:
    w1 = _window(
        "calibrated",
        1,
        2.0,
        [Sample(0.010, 200, 1, True, 0), Sample(0.020, 200, 2, False, 1)],
        cpu=0.3,
    )
    w2 = _window(
        "calibrated",
        1,
        2.0,
        [
            Sample(0.030, 200, 3, True, 2),
            Sample(0.5, 429, None, None, 3),
            Sample(1.0, 0, None, None, 4),
        ],
        cpu=0.2,
    )
    a = aggregate([w1, w2])
    assert a["requests"] == 5 and a["failures"] == 2
    assert a["statuses"] == {"200": 3, "429": 1, "0": 1}
    assert a["seconds"] == 4.0
    assert a["throughput_rps"] == pytest.approx(3 / 4)  # successful requests only
    assert a["throughput_rps_per_window"] == [1.0, 0.5]
    assert a["p50_ms"] == pytest.approx(20.0)  # failures' latencies are left out
    assert a["p95_ms"] == pytest.approx(29.0)
    assert a["mean_exit_layer"] == pytest.approx(2.0)
    assert a["accuracy"] == pytest.approx(2 / 3, abs=1e-4)
    assert a["server_cpu_ms_per_request"] == pytest.approx(100.0)  # 0.5 s / 5 requests
    assert a["client_cpu_ms_per_request"] == pytest.approx(40.0)


def test_aggregate_of_nothing() -> None:
    a = aggregate([_window("full_depth", 8, 1.0, [])])
    assert a["requests"] == 0 and a["throughput_rps"] == 0.0
    assert a["p50_ms"] is None and a["accuracy"] is None and a["server_cpu_ms_per_request"] is None


def test_paired_accuracy_difference() -> None:
    cal = correctness_by_text(
        [_window("calibrated", 1, 1.0, [Sample(0.01, 200, 1, True, i) for i in range(4)])]
    )
    full = {0: True, 1: False, 2: False, 9: True}
    diff, n = paired_accuracy_difference(cal, full)
    assert n == 3 and diff == pytest.approx(2 / 3)
    assert paired_accuracy_difference({}, full) == (None, 0)


def _row(rps: float, p50: float, acc: float, n: int = 100) -> dict[str, object]:
    return {
        "throughput_rps": rps,
        "p50_ms": p50,
        "accuracy": acc,
        "requests": n,
        "failures": 0,
    }


def test_compute_ratios() -> None:
    rows = {
        ("calibrated", 1): _row(200.0, 5.0, 0.80, 100),
        ("full_depth", 1): _row(100.0, 10.0, 0.82, 50),
        ("calibrated", 8): _row(600.0, 12.0, 0.80, 300),
        ("full_depth", 8): _row(200.0, 40.0, 0.83, 100),
    }
    in_process = {"throughput_rps": 250.0, "p50_ms": 4.0}
    r = compute_ratios(rows, in_process, (-0.01, 40))
    assert r["throughput_calibrated_over_full_depth@c1"] == pytest.approx(2.0)
    assert r["throughput_calibrated_over_full_depth@c8"] == pytest.approx(3.0)
    assert r["p50_calibrated_over_full_depth@c1"] == pytest.approx(0.5)
    assert "p50_calibrated_over_full_depth@c8" not in r
    # Pooled, weighted by answered requests: 0.80 vs (0.82*50 + 0.83*100)/150.
    assert r["accuracy_calibrated_minus_full_depth"] == pytest.approx(0.80 - 124 / 150, abs=1e-4)
    assert r["accuracy_calibrated_minus_full_depth_paired"] == pytest.approx(-0.01)
    assert r["accuracy_paired_texts"] == 40
    assert r["throughput_http_c1_calibrated_over_in_process"] == pytest.approx(0.8)
    assert r["p50_http_c1_calibrated_minus_in_process_ms"] == pytest.approx(1.0)
    # No concurrency 1, no in-process run: those ratios are simply absent.
    r8 = compute_ratios({k: v for k, v in rows.items() if k[1] == 8}, None)
    assert "throughput_http_c1_calibrated_over_in_process" not in r8
    assert r8["p50_calibrated_over_full_depth@c8"] == pytest.approx(0.3)
    assert compute_ratios({}, None)["accuracy_calibrated_minus_full_depth"] is None


def test_markdown_lists_every_row_and_ratio() -> None:
    rows = {
        ("calibrated", 1): {"config": "calibrated", "concurrency": 1, **_summary(0.8)},
        ("full_depth", 1): {"config": "full_depth", "concurrency": 1, **_summary(None)},
    }
    in_process = {"config": "in_process", "concurrency": 1, **_summary(0.8)}
    result = {
        "model": "tiny",
        "date": "2026-01-01T00:00:00+00:00",
        "host": "h",
        "usable_cpus": 2,
        "num_layers": 4,
        "texts": 20,
        "server": {
            "device": "cpu",
            "dtype": "int8",
            "threads": 2,
            "max_batch_size": 32,
            "max_queue_delay_ms": 2.0,
        },
        "options": {"duration": 2.0, "rounds": 2, "warmup": 0.5},
        "results": list(rows.values()),
        "in_process": in_process,
        "ratios": compute_ratios(rows, in_process, (0.0, 20)),
    }
    md = markdown(result)
    assert md.count("\n| calibrated | 1 |") == 1 and md.count("\n| full_depth | 1 |") == 1
    assert "| in-process engine (no HTTP) | 1 |" in md
    assert "throughput, calibrated / full_depth, concurrency 1 | 1.00x |" in md
    assert "—" in md  # a missing figure prints as a dash, not None


def _summary(acc: float | None) -> dict[str, object]:
    w = _window("x", 1, 1.0, [Sample(0.004, 200, 2, None if acc is None else True, 0)])
    return aggregate([w])


# -- the client loop against a fake server --------------------------------------------
async def _fake_server(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counter: list[int]
) -> None:
    """Answers /predict: mostly 200, every 5th 429, every 7th closes the connection."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            )
            body = json.loads(await reader.readexactly(length))
            counter[0] += 1
            n = counter[0]
            if n % 5 == 0:
                out, status = b'{"error": "busy", "error_type": "overloaded"}', b"429 Too Many"
            else:
                layer = 4 if body["parameters"].get("threshold") == 1.0 else 1
                pred = {"label": body["inputs"], "score": 0.9, "exit_layer": layer}
                out, status = json.dumps({"predictions": [pred]}).encode(), b"200 OK"
            close = n % 7 == 0
            writer.write(
                b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\n"
                b"content-length: "
                + str(len(out)).encode()
                + b"\r\n"
                + (b"connection: close\r\n" if close else b"")
                + b"\r\n"
                + out
            )
            await writer.drain()
            if close:
                writer.close()
                return
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


def test_client_records_answers_and_failures_without_raising() -> None:
    texts = ["positive", "negative", "positive"]
    labels = ["positive", "positive", "positive"]  # "negative" is judged wrong

    async def main() -> list[Window]:
        counter = [0]
        server = await asyncio.start_server(
            lambda r, w: _fake_server(r, w, counter), "127.0.0.1", 0
        )
        port = server.sockets[0].getsockname()[1]
        windows = []
        try:
            for params in ({}, {"threshold": 1.0}):
                requests = [
                    build_request(
                        "127.0.0.1",
                        "/predict",
                        json.dumps({"inputs": t, "parameters": params}).encode(),
                    )
                    for t in texts
                ]
                conns = [Connection("127.0.0.1", port) for _ in range(2)]
                state = _State()
                cursors = [0, 1]
                workers = [
                    _http_worker(conns[i], requests, labels, cursors, i, state) for i in range(2)
                ]
                secs, _, _ = await run_window(workers, state, 0.05, 0.3, os.getpid())
                for conn in conns:
                    conn.close()
                windows.append(Window("x", 2, 0, secs, 0.0, 0.0, state.samples))
        finally:
            server.close()
            await server.wait_closed()
        return windows

    for w, layer in zip(asyncio.run(main()), (1, 4), strict=True):
        a = aggregate([w])
        assert a["requests"] > 5
        assert a["failures"] == a["statuses"].get("429", 0) > 0
        assert set(a["statuses"]) <= {"200", "429"}  # closed connections were reopened
        assert a["mean_exit_layer"] == layer
        assert 0 < a["accuracy"] < 1
        assert all(s.text_index in (0, 1, 2) for s in w.samples)


def test_exit_metric_lines_keeps_only_the_exit_counters() -> None:
    exposition = "\n".join(
        [
            "# HELP exitserve_exits_total Inputs answered at each exit",
            "# TYPE exitserve_exits_total counter",
            'exitserve_exits_total{exit_layer="1"} 7.0',
            'exitserve_exits_total{exit_layer="2"} 3.0',
            "exitserve_exits_totally_other 1.0",
            "exitserve_layers_executed_total 13.0",
            "exitserve_layers_skipped_total 27.0",
            'exitserve_batch_size_bucket{le="1.0"} 2.0',
            "exitserve_batch_size_count 4.0",
            "exitserve_batch_size_sum 10.0",
            'exitserve_requests_total{endpoint="/predict",status="200"} 10.0',
        ]
    )
    assert exit_metric_lines(exposition) == [
        'exitserve_exits_total{exit_layer="1"} 7.0',
        'exitserve_exits_total{exit_layer="2"} 3.0',
        "exitserve_layers_executed_total 13.0",
        "exitserve_layers_skipped_total 27.0",
        "exitserve_batch_size_count 4.0",
        "exitserve_batch_size_sum 10.0",
    ]


# -- the whole harness (slow) -----------------------------------------------------------
@pytest.mark.slow
def test_whole_harness_against_a_tiny_model(tmp_path: Path) -> None:
    model = make_tiny_model_with_data(tmp_path / "tiny")
    result, path = run(
        Options(
            model_dir=model,
            out=tmp_path / "results",
            duration=2.0,
            rounds=2,  # two interleaved ~1 s windows per row
            warmup=0.3,
            concurrency=[1, 2],
            threads=1,
            quiet=True,
        )
    )
    assert path.is_file() and path.with_suffix(".md").is_file()
    saved = json.loads(path.read_text())
    assert saved["model"] == "tiny" and saved["num_layers"] == 4
    rows = {(r["config"], r["concurrency"]): r for r in saved["results"]}
    assert set(rows) == {(c, n) for c in ("calibrated", "full_depth") for n in (1, 2)}
    for row in [*rows.values(), saved["in_process"]]:
        assert row["requests"] > 0 and row["failures"] == 0, row
    for n in (1, 2):
        assert rows[("full_depth", n)]["mean_exit_layer"] == 4
        assert rows[("calibrated", n)]["mean_exit_layer"] <= 4
    assert len(saved["windows"]) == 2 * 2 * 2 + 1
    assert "throughput_calibrated_over_full_depth@c1" in saved["ratios"]
    assert "throughput_http_c1_calibrated_over_in_process" in saved["ratios"]
    # The server's own counters cover every answer it sent, warm-up windows included.
    counters = dict(line.rsplit(" ", 1) for line in saved["server_metrics"])
    exits = sum(float(v) for k, v in counters.items() if k.startswith("exitserve_exits_total"))
    assert exits >= sum(r["requests"] for r in rows.values())
    executed = float(counters['exitserve_layers_executed_total{model="tiny"}'])
    skipped = float(counters['exitserve_layers_skipped_total{model="tiny"}'])
    audited = float(counters['exitserve_audit_answers_total{model="tiny"}'])
    assert executed + skipped == 4 * (exits + audited)  # an audit runs every layer
    print(markdown(result))
