"""bench/soak.py: references and judging, summaries, memory growth, bars, the report,
and (slow) a one-second smoke run of both modes against a tiny model. Nothing here
asserts a rate or a latency: only what was counted and that the run is well-formed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from bench.soak import (
    Options,
    Outcome,
    Reference,
    bars,
    judge,
    label_of,
    markdown,
    memory_growth,
    read_rss_bytes,
    reference_of,
    rss_bytes,
    run,
    summarize,
    tree_pss_bytes,
)
from tests.tiny import make_tiny_model, random_texts


def answer(label: str, scores: dict[str, float]) -> bytes:
    pred = {"label": label, "score": max(scores.values()), "exit_layer": 4, "num_layers": 4}
    return json.dumps({"model": "m", "predictions": [{**pred, "scores": scores}]}).encode()


def test_reference_holds_the_label_and_the_gap_to_the_runner_up() -> None:
    ref = reference_of(answer("b", {"a": 0.2, "b": 0.5, "c": 0.3}))
    assert ref.label == "b"
    assert ref.gap == pytest.approx(0.2)
    assert label_of(answer("a", {"a": 0.9, "b": 0.1})) == "a"


@pytest.mark.parametrize(
    ("label", "gap", "verdict"),
    [
        ("pos", 0.9, "correct"),
        ("pos", 0.01, "correct"),
        ("neg", 0.05, "borderline"),
        ("neg", 0.1, "wrong"),
        ("neg", 0.8, "wrong"),
    ],
)
def test_judge(label: str, gap: float, verdict: str) -> None:
    assert judge(label, Reference("pos", gap), flip_gap=0.1) == verdict


def test_read_rss() -> None:
    status = "Name:\tpython\nVmPeak:\t  900 kB\nVmRSS:\t  123456 kB\nThreads:\t4\n"
    assert read_rss_bytes(status) == 123456 * 1024
    with pytest.raises(ValueError, match="VmRSS"):
        read_rss_bytes("Name:\tzombie\n")
    with pytest.raises(ValueError, match="unit"):
        read_rss_bytes("VmRSS:\t 12 MB\n")


def test_rss_of_this_process_is_plausible() -> None:
    import os

    assert 1 << 20 < rss_bytes(os.getpid()) < 1 << 40


REFS = [Reference("pos", 0.9), Reference("neg", 0.02), Reference("pos", 0.6)]


def outcomes() -> list[Outcome]:
    return [
        Outcome(0, 200, 0.010, 0.0, "pos"),  # correct
        Outcome(1, 200, 0.020, 0.5, "pos"),  # near tie flipped: borderline
        Outcome(2, 200, 0.030, 0.0, "neg"),  # wrong
        Outcome(0, 429, 0.001, 0.0, None),
        Outcome(1, 429, 0.001, 0.0, None),
        Outcome(2, 503, 0.002, 0.0, None),
        Outcome(0, 0, 0.004, 0.0, None),  # broken connection
    ]


def test_summarize_counts_statuses_and_judges_accepted_answers() -> None:
    s = summarize(outcomes(), REFS, seconds=2.0, offered=10, flip_gap=0.1)
    assert s["offered"] == 10 and s["sent"] == 7 and s["not_sent"] == 3
    assert s["offered_rps"] == 5.0 and s["sent_rps"] == 3.5
    assert s["accepted"] == 3 and s["accepted_rps"] == 1.5
    assert s["statuses"] == {"0": 1, "200": 3, "429": 2, "503": 1}
    assert s["rejected_429"] == 2 and s["server_errors_5xx"] == 1 and s["broken"] == 1
    assert s["answers"] == {"correct": 1, "borderline": 1, "wrong": 1}
    assert s["flipped"] == [
        {"text": 1, "reference": "neg", "gap": 0.02, "answered": "pos", "times": 1},
        {"text": 2, "reference": "pos", "gap": 0.6, "answered": "neg", "times": 1},
    ]
    assert s["p50_ms"] == pytest.approx(20.0)
    assert s["max_ms"] == pytest.approx(30.0)
    assert s["p99_from_due_ms"] == pytest.approx(510.2, abs=0.1)  # the delayed one counts


def test_summarize_without_accepted_answers() -> None:
    s = summarize([Outcome(0, 429, 0.001, 0.0, None)], REFS, 1.0, 1, 0.1)
    assert s["accepted"] == 0 and s["p99_ms"] is None and s["max_ms"] is None


def test_memory_growth_starts_after_the_warm_up() -> None:
    mb = 2**20
    samples = [(0.0, 100 * mb), (5.0, 150 * mb), (10.0, 200 * mb), (20.0, 206 * mb)]
    m = memory_growth(samples, warmup_s=10.0)
    assert m["baseline_at_s"] == 10.0 and m["baseline_mb"] == 200.0
    assert m["final_mb"] == 206.0 and m["max_mb"] == 206.0
    assert m["growth"] == pytest.approx(0.03)
    assert memory_growth(samples, warmup_s=99.0)["growth"] == 0.0  # only the last sample
    with pytest.raises(ValueError):
        memory_growth([], 1.0)


def result(mode: str, **run: Any) -> dict[str, Any]:
    summary = summarize(
        [Outcome(0, 200, 0.01, 0.0, "pos"), Outcome(0, 429, 0.001, 0.0, None)], REFS, 1.0, 2, 0.1
    )
    summary.update(run)
    r: dict[str, Any] = {
        "mode": mode,
        "model": "tiny",
        "date": "2026-01-01T00:00:00+00:00",
        "host": "h",
        "usable_cpus": 2,
        "server": {
            "device": "cpu",
            "dtype": "fp32",
            "threads": 1,
            "max_batch_size": 32,
            "max_queue_size": 256,
        },
        "options": {"connections": 512},
        "texts": 3,
        "capacity_rps": 100.0,
        "capacity_given": False,
        "flip_gap": 0.1,
        "run": summary,
        "rss_before_mb": 100.0,
        "rss_after_mb": 101.0,
        "ready_after": True,
        "server_exit_code": 0,
    }
    if mode == "steady":
        r["memory"] = memory_growth([(0.0, 100 << 20), (10.0, 103 << 20)], 0.0)
    r["bars"] = bars(r)
    return r


def test_bars_of_a_good_flood_and_steady_run() -> None:
    flood = result("flood")
    assert flood["bars"] == {
        "no_5xx_or_broken_connection": True,
        "every_accepted_answer_correct": True,
        "ready_after_the_run": True,
        "exit_0_on_sigterm": True,
        "overloaded_429s_seen": True,
    }
    steady = result("steady")
    assert steady["bars"]["rss_growth_under_5_percent"] is True
    assert "overloaded_429s_seen" not in steady["bars"]


@pytest.mark.parametrize(
    ("change", "bar"),
    [
        ({"server_errors_5xx": 1}, "no_5xx_or_broken_connection"),
        ({"broken": 1}, "no_5xx_or_broken_connection"),
        ({"answers": {"correct": 0, "borderline": 0, "wrong": 1}}, "every_accepted_answer_correct"),
        ({"accepted": 0}, "every_accepted_answer_correct"),
        ({"rejected_429": 0}, "overloaded_429s_seen"),
    ],
)
def test_a_broken_bar_is_reported(change: dict[str, Any], bar: str) -> None:
    assert result("flood", **change)["bars"][bar] is False


def test_growth_of_5_percent_fails_steady() -> None:
    r = result("steady")
    r["memory"] = memory_growth([(0.0, 100 << 20), (10.0, 105 << 20)], 0.0)
    assert bars(r)["rss_growth_under_5_percent"] is False


@pytest.mark.parametrize("mode", ["flood", "steady"])
def test_markdown_reports_what_was_measured(mode: str) -> None:
    md = markdown(result(mode))
    assert md.startswith(f"# Soak ({mode}): tiny")
    for part in ("| 429 | 1 |", "1 / 0 / 0", "100.0 / 101.0 MB", "| exit 0 on sigterm | yes |"):
        assert part in md, part
    assert ("RSS from" in md) == (mode == "steady")


# -- both modes for about a second each (slow) --------------------------------------
@pytest.mark.slow
def test_smoke_both_modes_against_a_tiny_model(tmp_path: Path) -> None:
    model = make_tiny_model(tmp_path / "tiny")
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(random_texts(32, seed=4)) + "\n")
    common: dict[str, Any] = {
        "model_dir": model,
        "texts": texts,
        "quantization": "none",
        "threads": 1,
        "out": tmp_path / "results",
        "tag": "smoke",
        "quiet": True,
    }
    # A queue of 32 and 64 connections: overflows like the real thing, costs less.
    flood, path = run(Options(**common, duration=1.0, capacity_seconds=0.3, max_queue_size=32))
    steady, steady_path = run(
        Options(**common, steady=True, duration=1.0, capacity=50.0, rss_every=0.2, rss_warmup=0.4)
    )
    for r, p in ((flood, path), (steady, steady_path)):
        assert json.loads(p.read_text()) == r
        assert p.with_suffix(".md").read_text() == markdown(r)
        assert r["run"]["server_errors_5xx"] == 0 and r["run"]["broken"] == 0
        assert r["run"]["answers"]["wrong"] == 0  # fp32: batched equals alone
        assert r["run"]["accepted"] > 0
        assert r["ready_after"] and r["server_exit_code"] == 0
    assert path.name.startswith("soak-flood-tiny-") and steady_path.name.startswith("soak-steady")
    assert flood["run"]["sent"] > 0 and flood["capacity_given"] is False
    assert steady["capacity_given"] is True and len(steady["rss_samples"]) >= 2
    assert steady["run"]["statuses"].keys() <= {"200", "429"}


def test_tree_pss_sums_a_process_and_its_children() -> None:
    """A child's PSS is at most its VmRSS, and counts in its parent's tree."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.5)
        alone = tree_pss_bytes(child.pid)
        assert 1 << 20 < alone <= rss_bytes(child.pid)
        assert tree_pss_bytes(os.getpid()) >= alone + (1 << 20)
    finally:
        child.kill()
        child.wait()
