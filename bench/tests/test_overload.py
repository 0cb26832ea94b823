"""bench/overload.py: what a run counts, the bars it checks and the report it writes.
Nothing here asserts a rate or a latency of a real server: synthetic samples only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.overload import Options, Sample, bars, markdown, metric, plot, settings_of, summarize

TRUTH = ["positive", "negative"]


def samples() -> list[Sample]:
    return [
        Sample(0, 200, 0.050, 0, False, "positive", 0.045, 0.010),  # right, in time
        Sample(1, 200, 0.150, 2, False, "positive", 0.140, 0.100),  # wrong, in time
        Sample(1, 200, 0.400, 2, False, "negative", 0.390, 0.300),  # right, late
        Sample(0, 429, 0.002, None, True, None),
        Sample(0, 429, 0.002, None, False, None),  # a refusal without Retry-After
        Sample(1, 0, 0.001, None, False, None),  # broken connection
    ]


def test_summarize_counts_goodput_accuracy_and_refusals() -> None:
    r = summarize(samples(), offered=8, seconds=2.0, truth=TRUTH, target_s=0.2, points=[0, 2, 2, 0])
    assert (r["answered"], r["refused"], r["broken"]) == (3, 2, 1)
    assert r["refused_without_retry_after"] == 1
    assert r["offered_rps"] == 4.0 and r["sent_rps"] == 3.0
    assert r["throughput_rps"] == 1.5 and r["goodput_rps"] == 1.0  # 2 of 3 within 200 ms
    assert r["served_accuracy"] == round(2 / 3, 4)
    assert r["mean_point_served"] == round(4 / 3, 3)
    assert r["share_at_point_0"] == 0.5 and r["max_point"] == 2
    assert r["p50_ms"] == 150.0 and r["server_p50_ms"] == 140.0 and r["queue_p50_ms"] == 100.0


def row(config: str, load: float, **kw: Any) -> dict[str, Any]:
    base = {
        "config": config,
        "load": load,
        "p99_ms": 250.0,
        "goodput_rps": 100.0,
        "served_accuracy": 0.82,
        "server_errors": 0,
        "broken": 0,
        "refused_without_retry_after": 0,
        "share_at_point_0": 1.0,
        "recovery_s": 1.0,
    }
    return {**base, **kw}


def test_bars_compare_adaptive_with_static_in_the_same_run() -> None:
    o = Options(Path("m"), target_ms=200, drop=0.02)
    rows = [row("static", 2.0, goodput_rps=10.0), row("adaptive", 2.0), row("default", 1.0)]
    assert all(bars(rows, o, calibrated_accuracy=0.83).values())
    worse = [
        row("static", 2.0, goodput_rps=80.0),
        row("adaptive", 2.0, p99_ms=260.0),  # 1.3x the target
        row("adaptive", 5.0, p99_ms=250.0),  # 1.25x: holds
    ]
    failed = {k for k, ok in bars(worse, o, 0.83).items() if not ok}
    assert failed == {
        "2x: adaptive goodput >= 1.5 x static",
        "2x: adaptive accepted p99 <= 1.25 x target",
    }
    # 0.82 < 0.83 - 0.02 - 0.005 fails; a late recovery and a missing Retry-After too.
    bad = [
        row("static", 2.0, goodput_rps=1.0),
        row("adaptive", 2.0, served_accuracy=0.80, refused_without_retry_after=1),
        row("default", 1.0, share_at_point_0=0.9, recovery_s=None),
    ]
    failed = {k for k, ok in bars(bad, o, 0.83).items() if not ok}
    assert failed == {
        "2x: served accuracy >= calibrated - drop - 0.5 point",
        "adaptive, default: every refusal carries Retry-After",
        "default 1x: at point 0 >= 95% of the time",
        "adaptive, default: back at point 0 within 10 s after every load",
    }


def test_each_configuration_sets_what_it_claims() -> None:
    o = Options(Path("m"), target_ms=200, drop=0.03)
    assert settings_of(o, "static")["latency_target_ms"] == 0
    assert settings_of(o, "admission")["max_accuracy_drop"] == 0.0
    assert (settings_of(o, "adaptive")["latency_target_ms"], o.drop) == (200, 0.03)
    default = settings_of(o, "default")
    assert "latency_target_ms" not in default and "max_accuracy_drop" not in default


def test_metric_sums_the_series_of_one_metric() -> None:
    text = (
        '# HELP x\nexitserve_operating_point{model="a"} 2.0\n'
        'exitserve_operating_point{model="b"} 1.0\nexitserve_operating_point_x 5\n'
    )
    assert metric(text, "exitserve_operating_point") == 3.0
    assert metric("exitserve_operating_point 2.0\n", "exitserve_operating_point") == 2.0
    assert metric(text, "exitserve_missing") is None


def test_the_report_and_plot_are_written(tmp_path: Path) -> None:
    rows = [
        {**summarize(samples(), 8, 2.0, TRUTH, 0.2, [0, 1]), "config": c, "load": x}
        | {"recovery_s": 1.0}
        for c in ("static", "adaptive")
        for x in (1.0, 2.0)
    ]
    result = {
        "model": "m",
        "date": "2026-11-30",
        "host": "h",
        "capacity_rps": 100.0,
        "saturation_rps": 130.0,
        "calibrated_test_accuracy": 0.83,
        "options": {"target_ms": 200.0, "drop": 0.02, "loads": [1.0, 2.0], "seconds": 2.0},
        "settings": {"adaptive": {"latency_target_ms": "200"}},
        "rows": rows,
        "bars": {"a bar": True},
    }
    md = markdown(result)
    assert "| adaptive | 2x |" in md and "PASS: a bar" in md
    plot(result, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
