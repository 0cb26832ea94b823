"""Several models in one server: routing by name, the repository routes, per-model
metrics, admission and unloading, and the start-up checks."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.api.conftest import build_settings
from tests.api.helpers import HeldEngine, metric_samples, predict, sample, scrape
from tests.tiny import make_tiny_model, random_texts

TOPICS = ("business", "sport", "tech")


@pytest.fixture(scope="module")
def topics_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second model: another name, three labels, three layers."""
    return make_tiny_model(
        tmp_path_factory.mktemp("models") / "topics", num_layers=3, labels=TOPICS, seed=3
    )


@pytest.fixture
def both(
    tiny_model_dir: Path, topics_dir: Path, serve: Callable[..., TestClient]
) -> Callable[..., TestClient]:
    """`both(**settings)`: a server of the tiny model (the default) and `topics`."""
    return lambda **s: serve(model_dir=f"{tiny_model_dir},{topics_dir}", **s)


def ask(client: TestClient, texts: list[str], model: str | None = None, **params: Any) -> Any:
    body: dict[str, Any] = {"inputs": texts, "parameters": params}
    if model is not None:
        body["model"] = model
    return client.post("/predict", json=body)


def test_each_model_answers_as_it_does_alone(
    both: Callable[..., TestClient], serve: Callable[..., TestClient], topics_dir: Path
) -> None:
    texts = random_texts(12, seed=11)
    client = both()
    alone = serve(model_dir=topics_dir)
    default = ask(client, texts).json()
    assert default["model"] == "tiny"
    assert {p["label"] for p in default["predictions"]} <= {"negative", "positive"}
    for params in ({}, {"threshold": 1.0}, {"max_layers": 2}):
        served = ask(client, texts, "topics", all_scores=True, **params).json()
        own = ask(alone, texts, all_scores=True, **params).json()
        assert served["model"] == "topics"
        assert served["predictions"] == own["predictions"]  # labels, scores, exits: same bits
        assert {p["label"] for p in served["predictions"]} <= set(TOPICS)
        assert all(p["num_layers"] == 3 for p in served["predictions"])


def test_an_unknown_model_is_404_naming_the_models_served(
    both: Callable[..., TestClient],
) -> None:
    client = both()
    for r in (
        ask(client, ["a"], "nope"),
        client.post(
            "/v2/models/nope/infer",
            json={"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]}]},
        ),
        client.get("/v2/models/nope"),
    ):
        assert r.status_code == 404
        assert r.json()["error_type"] == "not_found"
        assert "'nope'" in r.json()["error"] and "['tiny', 'topics']" in r.json()["error"]
    assert ask(client, ["a"], "topics").status_code == 200
    assert client.get("/readyz").status_code == 200


def test_the_open_inference_protocol_serves_every_model(
    both: Callable[..., TestClient],
) -> None:
    client = both()
    meta = client.get("/v2/models/topics").json()
    assert meta["name"] == "topics" and meta["parameters"]["labels"] == list(TOPICS)
    assert client.get("/v2/models/topics/versions/1/ready").json() == {
        "name": "topics",
        "ready": True,
    }
    assert client.get("/v2/models/topics/versions/2").status_code == 404
    body = {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["a", "b"]}]}
    out = client.post("/v2/models/topics/infer", json=body).json()
    assert out["model_name"] == "topics"
    labels = next(o for o in out["outputs"] if o["name"] == "label")["data"]
    assert labels == [p["label"] for p in ask(client, ["a", "b"], "topics").json()["predictions"]]
    assert "model_repository" in client.get("/v2").json()["extensions"]


def test_repository_index_info_and_metrics_list_both(both: Callable[..., TestClient]) -> None:
    client = both()
    index = client.post("/v2/repository/index").json()
    assert index == [
        {"name": "tiny", "version": "1", "state": "READY", "reason": ""},
        {"name": "topics", "version": "1", "state": "READY", "reason": ""},
    ]
    assert client.post("/v2/repository/index", json={"ready": True}).json() == index
    info = client.get("/info").json()
    assert info["model"] == "tiny"  # the top level is the default model's
    assert [m["model"] for m in info["models"]] == ["tiny", "topics"]
    assert info["models"][1]["labels"] == list(TOPICS) and info["models"][1]["num_layers"] == 3
    assert info["shares"]["slots"] == 1 and info["shares"]["weights"] == {"tiny": 1, "topics": 1}
    predict(client, "x")
    ask(client, ["y", "z"], "topics", threshold=1.0)
    m = scrape(client)
    assert sample(m, "exitserve_exits_total", model="topics", exit_layer="3") == 2
    assert sample(m, "exitserve_exits_total", model="tiny") == 1
    assert sample(m, "exitserve_requests_total", endpoint="predict", model="topics") == 1
    assert sample(m, "exitserve_ready", model="topics") == 1
    assert sample(m, "exitserve_ready", model="tiny") == 1
    # The exit histogram has a bucket for every exit of the deepest model.
    assert sample(m, "exitserve_exit_layer_bucket", model="topics", le="4.0") == 2


def test_load_and_unload_need_explicit_control(both: Callable[..., TestClient]) -> None:
    client = both()
    for action in ("load", "unload"):
        r = client.post(f"/v2/repository/models/topics/{action}")
        assert r.status_code == 400 and "EXITSERVE_MODEL_CONTROL" in r.json()["error"]
    assert ask(client, ["a"], "topics").status_code == 200


def test_unload_drains_the_model_and_leaves_the_other_serving(
    both: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A queue bound of 5: once it is full, all five requests are admitted.
    client = both(model_control="explicit", max_queue_size=5, max_inputs_per_request=5)
    held = HeldEngine(client, monkeypatch, "topics")
    engine = client.app.state.registry.engine("topics")  # type: ignore[attr-defined]
    texts = random_texts(5, seed=2)
    with ThreadPoolExecutor(8) as pool:
        admitted = [pool.submit(ask, client, [t], "topics") for t in texts]
        assert held.entered.wait(10)
        deadline = time.monotonic() + 10
        while not engine.full:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        unloading = pool.submit(client.post, "/v2/repository/models/topics/unload")
        # While it drains: new work for it is refused, the other model answers.
        states = {m["name"]: m["state"] for m in client.post("/v2/repository/index").json()}
        while states["topics"] == "READY":
            states = {m["name"]: m["state"] for m in client.post("/v2/repository/index").json()}
        assert states == {"tiny": "READY", "topics": "UNLOADING"}
        assert ask(client, ["late"], "topics").status_code == 503
        assert ask(client, ["other"]).status_code == 200
        held.release()
        assert unloading.result(10).status_code == 200
        assert [f.result(10).status_code for f in admitted] == [200] * len(texts)
    index = client.post("/v2/repository/index").json()
    assert index[1] == {"name": "topics", "version": "1", "state": "UNAVAILABLE",
                        "reason": "unloaded"}  # fmt: skip
    r = ask(client, ["a"], "topics")
    assert r.status_code == 503 and r.json()["error_type"] == "unavailable"
    assert client.get("/readyz").status_code == 200  # the loaded model is ready
    m = scrape(client)
    assert sample(m, "exitserve_exits_total", model="topics") == 0  # its series are gone
    assert sample(m, "exitserve_ready", model="tiny") == 1
    info = client.get("/info").json()
    assert info["models"][1] == {"model": "topics", "model_version": "1",
                                 "state": "UNAVAILABLE", "reason": "unloaded"}  # fmt: skip
    # And back.
    assert client.post("/v2/repository/models/topics/load").status_code == 200
    assert ask(client, ["a"], "topics").status_code == 200
    assert client.post("/v2/repository/models/nope/load").status_code == 404


def test_a_full_queue_of_one_model_refuses_only_that_model(
    both: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    client = both(max_queue_size=2, max_inputs_per_request=2, workers=1)
    held = HeldEngine(client, monkeypatch)  # the default model's only worker
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(ask, client, ["a"])
        assert held.entered.wait(10)
        queued = [pool.submit(ask, client, ["b"])]  # one in flight, one queued: full
        engine = client.app.state.registry.engine()  # type: ignore[attr-defined]
        deadline = time.monotonic() + 10
        while not engine.full:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        r = ask(client, ["d"])
        assert r.status_code == 429 and r.headers["retry-after"]
        # The other model, named in the body, is admitted and answered meanwhile.
        assert ask(client, ["e"], "topics").status_code == 200
        held.release()
        assert [f.result(10).status_code for f in [first, *queued]] == [200] * 2
    m = scrape(client)
    assert sample(m, "exitserve_rejected_total", reason="overloaded", model="tiny") == 1
    assert sample(m, "exitserve_rejected_total", reason="overloaded", model="topics") == 0


@pytest.mark.parametrize(
    ("dirs", "message"),
    [
        (lambda t, o: f"{t},{t}", "two models named 'tiny'"),
        (lambda t, o: f"{t},{o / 'missing'}", "missing"),
    ],
)
def test_start_up_stops_naming_the_model_that_cannot_be_served(
    tiny_model_dir: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    dirs: Callable[[Path, Path], str],
    message: str,
) -> None:
    app = create_app(build_settings(tiny_model_dir, model_dir=dirs(tiny_model_dir, tmp_path)))
    with pytest.raises(ValueError, match=message), TestClient(app):
        pass
    assert message in caplog.text


def test_weights_must_name_served_models(tiny_model_dir: Path, topics_dir: Path) -> None:
    settings = build_settings(tiny_model_dir, model_dir=f"{tiny_model_dir},{topics_dir}",
                              model_weights="tiny=2,other=1")  # fmt: skip
    with pytest.raises(ValueError, match="other"), TestClient(create_app(settings)):
        pass


def test_one_model_metrics_name_it_too(client: TestClient) -> None:
    predict(client, "x")
    m = metric_samples(client.get("/metrics").text)
    assert sample(m, "exitserve_exits_total", model="tiny") >= 1
    assert client.get("/info").json()["shares"] is None
