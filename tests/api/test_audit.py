"""The online audit over HTTP on the tiny model: what it counts, that answers never wait
for it, and a shifted stream that tightens the exits and a plain one that relaxes them."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api.helpers import predict, sample, scrape, wait_until_idle
from tests.tiny import random_texts


@pytest.fixture(scope="module")
def promised_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with calibration's promise: at most 20% disagreement."""
    d = tmp_path_factory.mktemp("audit") / "tiny"
    shutil.copytree(tiny_model_dir, d)
    spec = json.loads((d / "model.json").read_text())
    spec["calibration"] = {"max_disagreement": 0.2}
    (d / "model.json").write_text(json.dumps(spec))
    return d


def split(client: TestClient, texts: list[str]) -> tuple[list[str], list[str]]:
    """(texts whose answer at the model's exits is the last exit's, texts whose is not)."""
    early = [p for i in range(0, len(texts), 64) for p in predict(client, texts[i : i + 64])]
    full = [p for i in range(0, len(texts), 64)
            for p in predict(client, texts[i : i + 64], threshold=1.0)]  # fmt: skip
    plain = [t for t, a, b in zip(texts, early, full, strict=True) if a["label"] == b["label"]]
    shifted = [t for t, a, b in zip(texts, early, full, strict=True) if a["label"] != b["label"]]
    return plain, shifted


def test_every_audited_answer_is_counted_with_its_disagreement(
    serve: Callable[..., TestClient],
) -> None:
    client = serve(audit_rate=1.0)
    texts = random_texts(40, seed=8)
    full = [p["label"] for p in predict(client, texts, threshold=1.0)]  # not audited
    wait_until_idle(client)
    before = scrape(client)
    served = [predict(client, t)[0] for t in texts]  # one by one, each audited
    for _ in range(1000):  # the audits run after the answers: wait for all 40
        if client.get("/info").json()["audit"]["audited"] == len(texts):
            break
        threading.Event().wait(0.01)
    wait_until_idle(client)
    after = scrape(client)

    def delta(name: str) -> float:
        return sample(after, name) - sample(before, name)

    differ = sum(p["label"] != f for p, f in zip(served, full, strict=True))
    assert delta("exitserve_audit_answers_total") == len(texts)
    assert delta("exitserve_audit_disagreements_total") == differ
    # The audit's full-depth work is compute spent: 4 layers per audited answer.
    answered = sum(p["exit_layer"] for p in served)
    assert delta("exitserve_layers_executed_total") == answered + 4 * len(texts)
    info = client.get("/info").json()["audit"]
    assert info["audited"] == len(texts) and info["disagreed"] == differ
    assert info["promise"] is None and info["level"] == 0  # the tiny model promises nothing


def test_requests_with_their_own_rule_are_not_audited(serve: Callable[..., TestClient]) -> None:
    client = serve(audit_rate=1.0)
    for params in ({"threshold": 0.5}, {"max_layers": 2}):
        predict(client, random_texts(5, seed=2), **params)
    wait_until_idle(client)
    assert sample(scrape(client), "exitserve_audit_answers_total") == 0


def test_an_answer_never_waits_for_its_audit(
    serve: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    client = serve(audit_rate=1.0, workers=1)
    backend = client.app.state.registry.engine().runtime.backend  # type: ignore[attr-defined]
    entered, gate = threading.Event(), threading.Event()
    all_exits = backend.all_exits

    def held(ids: Any) -> Any:
        entered.set()
        gate.wait(10)
        return all_exits(ids)

    monkeypatch.setattr(backend, "all_exits", held)
    first = predict(client, "a first text")  # answered, then audited: the worker holds
    assert entered.wait(10)
    with ThreadPoolExecutor(1) as pool:
        # The only worker is inside the audit; the next request waits for it, but the
        # first answer came back before the audit even began to run.
        second = pool.submit(predict, client, "a second text")
        gate.set()
        assert second.result(10)[0]["exit_layer"] >= 1
    assert first[0]["exit_layer"] >= 1


def test_a_shifted_stream_tightens_the_exits_and_a_plain_one_relaxes_them(
    serve: Callable[..., TestClient], promised_dir: Path
) -> None:
    # Which texts disagree, asked of a server that does not audit.
    plain, shifted = split(serve(model_dir=promised_dir, audit=False), random_texts(600, seed=21))
    client = serve(model_dir=promised_dir, audit_rate=1.0, audit_window=50, workers=1)
    assert len(plain) >= 100 and len(shifted) >= 25, (len(plain), len(shifted))

    sent = [0]

    def audit() -> dict[str, Any]:
        state: dict[str, Any] = client.get("/info").json()["audit"]
        return state

    def stream(texts: list[str]) -> None:
        """Send one by one; wait until every answer has been audited."""
        for t in texts:
            predict(client, t)
        sent[0] += len(texts)
        for _ in range(1000):
            if audit()["audited"] == sent[0]:
                return
            threading.Event().wait(0.01)
        raise AssertionError("the audits never caught up")

    stream(plain[:60])
    assert audit()["level"] == 0 and audit()["promise"] == 0.2
    probe = shifted[:10]
    exits_before = [predict(client, t)[0]["exit_layer"] for t in probe]
    sent[0] += len(probe)
    stream((shifted * 3)[:50])  # a window of disagreeing answers
    tightened = audit()
    assert tightened["level"] > 0 and tightened["moves"]["tighten"] >= 1
    assert tightened["thresholds"][0] > client.get("/info").json()["exit_thresholds"][0]
    m = scrape(client)
    assert sample(m, "exitserve_threshold_moves_total", direction="tighten") >= 1
    assert sample(m, "exitserve_audit_disagreement_bound") == tightened["bound"]
    # The answers follow: the shifted texts now leave later than they did.
    exits_after = [predict(client, t)[0]["exit_layer"] for t in probe]
    sent[0] += len(probe)
    assert all(a >= b for a, b in zip(exits_after, exits_before, strict=True))
    assert sum(exits_after) > sum(exits_before)
    stream(plain[60:130])  # the stream returns
    relaxed = audit()
    assert relaxed["level"] == 0 and relaxed["moves"]["relax"] >= 1
    assert sample(scrape(client), "exitserve_threshold_moves_total", direction="relax") >= 1
