"""The Locust load test: its request mix and response checks (bench/loadmix.py, what
locustfile.py uses), the runner's CSV reading, and (slow) `bench/loadtest.py` against
a tiny model.

Nothing here imports locust or the locustfile: importing locust monkey-patches the
whole test process for gevent. The slow test runs Locust in its own process."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Any

import pytest

from bench.loadmix import (
    Corpus,
    Planned,
    check_info,
    check_predict,
    load_corpus,
    plan,
    split_by_length,
)
from bench.loadtest import locust_command, main, read_totals
from tests.tiny import make_tiny_model_with_data

CORPUS = Corpus(
    model="m",
    labels=("negative", "positive"),
    num_layers=6,
    short=("ok", "fine film"),
    long=("a much longer sentence about a film", "another long review of a movie"),
)


def answer(*preds: dict[str, Any], model: str = "m") -> bytes:
    return json.dumps({"model": model, "model_version": "1", "predictions": list(preds)}).encode()


def pred(label: str = "positive", score: float = 0.9, exit_layer: int = 2, **kw: Any) -> dict:
    return {"label": label, "score": score, "exit_layer": exit_layer, "num_layers": 6, **kw}


# -- the request mix -------------------------------------------------------------------
def test_split_by_length_cuts_at_the_median() -> None:
    short, long = split_by_length(["aaaa", "a", "aaa", "aa"])
    assert short == ("a", "aa") and long == ("aaa", "aaaa")
    assert split_by_length(["only"]) == (("only",), ("only",))
    with pytest.raises(ValueError):
        split_by_length([])


def test_single_inputs_go_as_a_bare_string_without_parameters() -> None:
    rng = random.Random(0)
    for _ in range(20):
        req = plan(CORPUS, rng, "single", long=False)
        assert req.count == 1 and req.name == "single"
        assert req.body == {"inputs": req.body["inputs"]}
        assert req.body["inputs"] in CORPUS.short
    assert plan(CORPUS, rng, "x", long=True).body["inputs"] in CORPUS.long


def test_batches_and_parameters() -> None:
    rng = random.Random(1)
    req = plan(CORPUS, rng, "b", size=5, threshold=1.0, max_layers=3, all_scores=True)
    assert req.count == 5 and len(req.body["inputs"]) == 5
    assert set(req.body["inputs"]) <= set(CORPUS.short + CORPUS.long)
    assert req.body["parameters"] == {"threshold": 1.0, "max_layers": 3, "all_scores": True}
    assert (req.threshold, req.max_layers, req.all_scores) == (1.0, 3, True)
    # threshold 0.0 is a parameter too, not a missing one.
    assert plan(CORPUS, rng, "z", threshold=0.0).body["parameters"] == {"threshold": 0.0}
    with pytest.raises(ValueError):
        plan(CORPUS, rng, "none", size=0)


def test_mixed_requests_draw_short_and_long_texts() -> None:
    rng = random.Random(2)
    drawn = {t for _ in range(50) for t in plan(CORPUS, rng, "b", size=4).body["inputs"]}
    assert drawn & set(CORPUS.short) and drawn & set(CORPUS.long)


# -- checking answers ------------------------------------------------------------------
SINGLE = Planned("s", {"inputs": "ok"}, 1)
PAIR = Planned("p", {"inputs": ["ok", "fine film"]}, 2)


def test_good_answers_pass() -> None:
    assert check_predict(SINGLE, 200, answer(pred()), CORPUS) is None
    assert check_predict(PAIR, 200, answer(pred(), pred("negative", 0.5, 6)), CORPUS) is None
    full = Planned("f", {}, 1, threshold=1.0)
    assert check_predict(full, 200, answer(pred(exit_layer=6)), CORPUS) is None
    capped_full = Planned("c", {}, 1, threshold=1.0, max_layers=3)
    assert check_predict(capped_full, 200, answer(pred(exit_layer=3)), CORPUS) is None
    first = Planned("z", {}, 1, threshold=0.0)
    assert check_predict(first, 200, answer(pred(exit_layer=1)), CORPUS) is None
    scored = Planned("a", {}, 1, all_scores=True)
    scores = {"negative": 0.1, "positive": 0.9}
    assert check_predict(scored, 200, answer(pred(scores=scores)), CORPUS) is None


@pytest.mark.parametrize(
    ("req", "status", "body", "expected"),
    [
        (SINGLE, 503, answer(pred()), "status 503"),
        (SINGLE, 429, b'{"error": "overloaded"}', "status 429"),
        (SINGLE, 0, None, "status 0"),  # a broken connection
        (SINGLE, 200, b"<html>", "not JSON"),
        (SINGLE, 200, b"[1, 2]", "not a JSON object"),
        (SINGLE, 200, answer(pred(), model="other"), "model 'other'"),
        (SINGLE, 200, b'{"model": "m"}', "no predictions list"),
        (PAIR, 200, answer(pred()), "1 predictions for 2 inputs"),
        (SINGLE, 200, answer(pred(), pred()), "2 predictions for 1 inputs"),
        (SINGLE, 200, answer("x"), "not an object"),
        (SINGLE, 200, answer(pred("neutral")), "label 'neutral'"),
        (SINGLE, 200, answer(pred(score=1.5)), "score 1.5"),
        (SINGLE, 200, answer(pred(score="high")), "score 'high'"),
        (SINGLE, 200, answer(pred(exit_layer=0)), "exit_layer 0 outside 1..6"),
        (SINGLE, 200, answer(pred(exit_layer=7)), "exit_layer 7 outside 1..6"),
        (SINGLE, 200, answer(pred(exit_layer=2.0)), "exit_layer 2.0"),
        (SINGLE, 200, answer(pred(num_layers=4)), "num_layers 4"),
        (SINGLE, 200, answer(pred(scores={"positive": 1.0})), "scores sent unasked"),
        (PAIR, 200, answer(pred(), pred("nope")), "prediction 1: label 'nope'"),
    ],
)
def test_bad_answers_are_caught(req: Planned, status: int, body: Any, expected: str) -> None:
    problem = check_predict(req, status, body, CORPUS)
    assert problem is not None and expected in problem, problem


def test_parameters_bind_the_exit_layer() -> None:
    capped = Planned("c", {}, 1, max_layers=3)
    assert check_predict(capped, 200, answer(pred(exit_layer=3)), CORPUS) is None
    assert "outside 1..3" in (check_predict(capped, 200, answer(pred(exit_layer=4)), CORPUS) or "")
    full = Planned("f", {}, 1, threshold=1.0)
    assert "threshold 1.0 left at exit 5, not 6" in (
        check_predict(full, 200, answer(pred(exit_layer=5)), CORPUS) or ""
    )
    capped_full = Planned("c", {}, 1, threshold=1.0, max_layers=3)
    assert "not 3" in (check_predict(capped_full, 200, answer(pred(exit_layer=2)), CORPUS) or "")
    first = Planned("z", {}, 1, threshold=0.0)
    assert "not 1" in (check_predict(first, 200, answer(pred(exit_layer=2)), CORPUS) or "")
    half = Planned("h", {}, 1, threshold=0.5)  # any exit will do
    assert check_predict(half, 200, answer(pred(exit_layer=4)), CORPUS) is None


@pytest.mark.parametrize(
    ("scores", "expected"),
    [
        (None, "do not cover the labels"),
        ({"positive": 1.0}, "do not cover the labels"),
        ({"negative": 0.1, "positive": "x"}, "non-number"),
        ({"negative": 0.3, "positive": 0.9}, "sum to 1.2000"),
        ({"negative": 0.9, "positive": 0.1}, "not the top score"),
    ],
)
def test_bad_all_scores_are_caught(scores: Any, expected: str) -> None:
    req = Planned("a", {}, 1, all_scores=True)
    problem = check_predict(req, 200, answer(pred(scores=scores)), CORPUS)
    assert problem is not None and expected in problem, problem


def test_info_must_describe_the_model() -> None:
    good = {"model": "m", "labels": ["negative", "positive"], "num_layers": 6, "device": "cpu"}
    assert check_info(200, json.dumps(good), CORPUS) is None
    assert check_info(503, json.dumps(good), CORPUS) == "status 503"
    assert "not JSON" in (check_info(200, "", CORPUS) or "")
    for change, expected in [
        ({"model": "x"}, "model 'x'"),
        ({"labels": ["positive", "negative"]}, "labels"),
        ({"num_layers": 4}, "num_layers 4"),
    ]:
        assert expected in (check_info(200, json.dumps({**good, **change}), CORPUS) or "")


# -- the runner ------------------------------------------------------------------------
STATS_HEADER = (
    "Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,"
    "Min Response Time,Max Response Time,Average Content Size,Requests/s,Failures/s,"
    "50%,66%,75%,80%,90%,95%,98%,99%,99.9%,99.99%,100%"
)


def test_read_totals_takes_the_aggregated_row(tmp_path: Path) -> None:
    stats = tmp_path / "x_stats.csv"
    stats.write_text(
        STATS_HEADER
        + "\nPOST,/predict 1 short,10,1,5,6,1,20,100,3.5,0.1,5,6,7,8,9,12,15,18,20,20,20\n"
        + ",Aggregated,40,2,6,7,1,30,100,12.25,0.2,6,7,8,9,10,14,17,21,30,30,30\n"
    )
    t = read_totals(stats)
    assert (t.requests, t.failures, t.rps, t.p50_ms, t.p95_ms, t.p99_ms) == (
        40,
        2,
        12.25,
        6,
        14,
        21,
    )
    assert t.line().startswith("40 requests, 2 failures, 12.2 req/s, p50 6 ms")
    stats.write_text(STATS_HEADER + "\n")
    with pytest.raises(ValueError, match="no Aggregated row"):
        read_totals(stats)


def test_locust_command_is_headless_with_reports() -> None:
    cmd = locust_command("http://127.0.0.1:9", 3, 1.5, 7, Path("out/locust-d-h"), ["-L", "INFO"])
    joined = " ".join(cmd)
    assert cmd[1:3] == ["-m", "locust"] and cmd[4].endswith("locustfile.py")
    for part in (
        "--headless -u 3 -r 1.5 -t 7s",
        "--host http://127.0.0.1:9",
        "--csv out/locust-d-h --html out/locust-d-h.html",
        "--exit-code-on-error 1",
    ):
        assert part in joined
    assert cmd[-2:] == ["-L", "INFO"]


# -- the whole run, against a tiny model (slow) ----------------------------------------
def tiny_model_with_data(tmp_path: Path) -> Path:
    return make_tiny_model_with_data(tmp_path / "tiny")


def test_load_corpus_reads_the_test_split(tmp_path: Path) -> None:
    corpus = load_corpus(tiny_model_with_data(tmp_path))
    assert (corpus.model, corpus.labels, corpus.num_layers) == ("tiny", ("negative", "positive"), 4)
    assert corpus.short and corpus.long
    assert max(map(len, corpus.short)) <= min(map(len, corpus.long))


@pytest.mark.slow
def test_loadtest_against_a_tiny_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = tiny_model_with_data(tmp_path)
    out = tmp_path / "results"
    args = [str(model), "--users", "2", "--spawn-rate", "2", "--duration", "3", "--threads", "1"]
    rc = main([*args, "--out", str(out), "--tag", "test", "--", "--only-summary"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    [stats] = out.glob("locust-*-test_stats.csv")
    assert stats.with_name(stats.name.replace("_stats.csv", ".html")).is_file()
    totals = read_totals(stats)
    assert totals.requests > 0 and totals.failures == 0
    with stats.open(newline="") as f:
        names = {row["Name"] for row in csv.DictReader(f)}
    assert "/predict 1 short" in names or "/predict batch 2-8" in names
    assert f"locust: {totals.requests} requests, 0 failures" in printed
