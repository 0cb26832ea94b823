"""bench/harness.py: FLOP counting, useful throughput, the bars, the report, and (slow)
the whole harness against a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.harness import (
    Options,
    check_bars,
    encoder_flops,
    exit_histogram,
    markdown,
    run,
    useful_gflops,
)
from bench.http_bench import Sample
from tests.tiny import make_tiny_model_with_data


def test_encoder_flops_counts_projections_and_attention() -> None:
    # One MiniLM layer over 10 tokens: 2*10*(4*384^2 + 2*384*1536) + 4*10^2*384.
    assert encoder_flops(10, 1, 384, 1536) == 35_389_440 + 153_600
    assert encoder_flops(10, 6, 384, 1536) == 6 * encoder_flops(10, 1, 384, 1536)
    assert encoder_flops(0, 6, 384, 1536) == 0


def test_useful_gflops_counts_answered_requests_at_their_depth() -> None:
    tokens = [10, 20]
    samples = [
        Sample(0.01, 200, 2, True, 0),  # exited at layer 2
        Sample(0.01, 200, None, True, 1),  # a full-depth peer: every layer
        Sample(0.01, 0, None, None, 1),  # failed: no useful work
    ]
    expected = encoder_flops(10, 2, 384, 1536) + encoder_flops(20, 6, 384, 1536)
    assert useful_gflops(samples, tokens, 2.0, 384, 1536, 6) == pytest.approx(expected / 2e9)
    assert useful_gflops(samples, tokens, 0.0, 384, 1536, 6) == 0.0


def test_exit_histogram_has_every_layer() -> None:
    samples = [Sample(0.01, 200, e, True, 0) for e in (1, 1, 3)] + [Sample(0.1, 0, None, None, 0)]
    assert exit_histogram(samples, 4) == {1: 2, 2: 0, 3: 1, 4: 0}


def _row(config: str, c: int, rps: float, p50: float, acc: float, failures: int = 0) -> dict:
    return {
        "config": config,
        "concurrency": c,
        "throughput_rps": rps,
        "p50_ms": p50,
        "p95_ms": p50,
        "p99_ms": p50,
        "mean_exit_layer": None,
        "accuracy": acc,
        "requests": 100,
        "failures": failures,
        "server_cpu_ms_per_request": 1.0,
        "useful_gflops": 1.0,
        "fraction_of_peak": 0.01,
    }


def test_check_bars_reports_met_missed_and_missing() -> None:
    rows = {
        ("calibrated", 1): _row("calibrated", 1, 100, 5.0, 0.83),
        ("full_depth", 1): _row("full_depth", 1, 60, 10.0, 0.835),
        ("calibrated", 16): _row("calibrated", 16, 400, 40.0, 0.83),
        ("full_depth", 16): _row("full_depth", 16, 200, 80.0, 0.835),
        ("naive_fp32", 16): _row("naive_fp32", 16, 120, 130.0, 0.84),
        ("onnx_int8", 1): _row("onnx_int8", 1, 80, 8.0, 0.80, failures=2),
    }
    bars = {b["bar"]: b for b in check_bars(rows)}
    assert bars["(a)/(b) throughput"]["value"] == 2.0
    assert bars["(a)/(b) throughput"]["status"] == "met"
    assert (
        bars["(a)/(b) p50 latency"]["value"] == 0.5
        and bars["(a)/(b) p50 latency"]["status"] == "met"
    )
    assert bars["(a)-(b) accuracy, points"]["value"] == pytest.approx(-0.5)
    assert bars["(a)-(b) accuracy, points"]["status"] == "met"
    assert bars["(a)/(c) throughput"]["status"] == "missed"  # 3.33x < 4x
    assert bars["(a)/(d) throughput"]["status"] == "no data"  # onnx has no c16 row
    assert bars["(a)/(d) throughput, 1 client"]["value"] == 1.25  # 100 / 80
    assert bars["(a)/(d) throughput, 1 client"]["status"] == "missed"
    assert "(a)/(d) throughput, 4 clients" not in bars  # no c4 rows at all
    assert bars["(a)-(d) accuracy, points"]["status"] == "missed"  # 3 points
    failed = bars["failed requests, every configuration"]
    assert failed["status"] == "missed" and failed["per_config"]["onnx_int8"] == 2


def test_markdown_lists_rows_bars_and_exits() -> None:
    rows = [_row("calibrated", 1, 100, 5.0, 0.83), _row("full_depth", 1, 60, 10.0, 0.835)]
    r = {
        "model": "m",
        "date": "2026-01-01T00:00:00+00:00",
        "host": "h",
        "usable_cpus": 2,
        "command": "bench/harness.py m",
        "options": {"duration": 1, "rounds": 1, "warmup": 0.5},
        "texts_tokens": [3, 4],
        "peak_gflops": 90.0,
        "results": rows,
        "bars": check_bars({(x["config"], x["concurrency"]): x for x in rows}),
        "exit_histogram": {1: 3, 2: 1},
    }
    md = markdown(r)
    assert "| calibrated | 1 | 100.0 |" in md and "| full_depth | 1 | 60.0 |" in md
    assert "| (a)/(b) p50 latency | 1 | 0.50 | <= 0.6 | met |" in md
    assert "| share | 75.0% | 25.0% |" in md


@pytest.mark.slow
def test_whole_harness_against_a_tiny_model(tmp_path: Path) -> None:
    model = make_tiny_model_with_data(tmp_path / "tiny")
    result, path = run(
        Options(
            model_dir=model,
            out=tmp_path / "results",
            duration=1.0,
            warmup=0.3,
            concurrency=[1],
            threads=1,
            cache=tmp_path / "cache",
            quiet=True,
        )
    )
    saved = json.loads(path.read_text())
    assert saved["model"] == "tiny" and saved["peak_gflops"] > 0
    rows = {r["config"]: r for r in saved["results"]}
    assert set(rows) == {"calibrated", "full_depth", "naive_fp32", "onnx_int8"}
    assert (tmp_path / "cache/onnx/tiny/model.int8.onnx").is_file()
    for row in rows.values():
        assert row["requests"] > 0 and row["failures"] == 0 and row["useful_gflops"] > 0
    for full in ("full_depth", "naive_fp32", "onnx_int8"):
        assert rows[full]["mean_exit_layer"] == 4
    assert sum(saved["exit_histogram"].values()) == rows["calibrated"]["requests"]
    for suffix in ("-latency.png", "-exits.png"):
        png = path.with_name(path.stem + suffix)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.with_suffix(".md").read_text() == markdown(result)


def test_peer_d_candidates_use_the_cpus_and_include_one_thread() -> None:
    from bench.harness import peer_d_candidates

    assert peer_d_candidates(2) == [(1, 2), (2, 1), (1, 1)]
    assert peer_d_candidates(1) == [(1, 1)]
