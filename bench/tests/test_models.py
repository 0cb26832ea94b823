"""The two-model benchmark's summary and report (the run itself: `python -m bench.models`)."""

from __future__ import annotations

from bench.client import Reply, Response
from bench.models import markdown, summary, unloaded_well


def reply(i: int, status: int, ms: float) -> Reply:
    headers = {"x-total-time": f"{ms - 1}", "x-queue-time": "0.5", "x-inference-time": "2"}
    return Reply(i, Response(status, headers, b"{}"), ms / 1000, 0.0)


def test_summary_counts_answers_and_takes_percentiles_of_the_answered_only() -> None:
    replies = [reply(i, 200, 10.0 + i) for i in range(100)] + [reply(0, 429, 1.0)]
    replies.append(Reply(1, None, 0.5, 0.0))
    s = summary(replies, offered=105, seconds=10.0)
    assert (s["offered"], s["sent"], s["answered"]) == (105, 102, 100)
    assert s["statuses"] == {"200": 100, "429": 1, "0": 1}
    assert s["answered_rps"] == 10.0
    assert s["p50_ms"] == 59.5 and s["p99_ms"] == 108.01
    assert s["server_p99_ms"] == 107.01 and s["engine_p99_ms"] == 2.5


def test_markdown_lists_the_three_traffics_and_every_bar() -> None:
    s = summary([reply(0, 200, 5.0)], 1, 1.0)
    r = {
        "date": "2026-12-04", "host": "h", "flooded": "a", "light": "b",
        "options": {"overload": 3.0, "light_rate": 10.0}, "flooded_capacity_rps": 800.0,
        "light_idle": s, "light_under_flood": s, "flooded_under_flood": s,
        "rss_one_model_mb": 500.0, "rss_two_models_mb": 700.0,
        "bars": {"x": True, "y": False},
    }  # fmt: skip
    md = markdown(r)
    for row in ("| light idle |", "| light under flood |", "| flooded under flood |"):
        assert row in md
    assert "| x | yes |" in md and "| y | NO |" in md and "two models 700.0 MB" in md


def test_an_unload_holds_only_when_nothing_broke_and_the_other_model_was_all_answered() -> None:
    def traffic(statuses: dict[str, int], broken: int = 0) -> dict[str, object]:
        return {"statuses": statuses, "broken": broken}

    good = {"unload_status": 200, "flooded": traffic({"200": 90}),
            "light": traffic({"200": 40, "503": 10})}  # fmt: skip
    assert unloaded_well(good)
    assert not unloaded_well({**good, "unload_status": 500})
    assert not unloaded_well({**good, "flooded": traffic({"200": 89, "503": 1})})
    assert not unloaded_well({**good, "light": traffic({"200": 40, "0": 1}, broken=1)})
    assert not unloaded_well({**good, "light": traffic({"200": 40, "500": 1})})
