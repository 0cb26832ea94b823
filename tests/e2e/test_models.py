"""Both shipped models in one real server: each answers as a server of it alone does,
through REST and the Triton client, and the repository index and metrics name both."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from app.network.artifact import read_spec
from app.training.evaluate import split_data
from tests.api.helpers import metric_samples, sample
from tests.server import ROOT, server_process

SENTIMENT = ROOT / "models" / "rt-sentiment-minilm"
TOPICS = ROOT / "models" / "bbc-topic-minilm"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not all((m / "model.json").is_file() for m in (SENTIMENT, TOPICS)),
        reason="default models not built",
    ),
]


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(URL of a server of both models, URL of a server of the topic model alone)."""
    logs = tmp_path_factory.mktemp("models")
    both = {"model_dir": f"{SENTIMENT},{TOPICS}", "threads": "2"}
    alone = {"model_dir": str(TOPICS), "threads": "2"}
    with (
        server_process(both, logs / "both.log") as (url, _),
        server_process(alone, logs / "alone.log") as (alone_url, _),
    ):
        yield url, alone_url


def predictions(url: str, texts: list[str], model: str | None = None) -> list[dict[str, Any]]:
    body: dict[str, Any] = {"inputs": texts, "parameters": {"all_scores": True}}
    if model is not None:
        body["model"] = model
    r = httpx.post(f"{url}/predict", json=body, timeout=60)
    assert r.status_code == 200, r.text
    out: list[dict[str, Any]] = r.json()["predictions"]
    return out


def test_the_topic_model_answers_as_it_does_alone(servers: tuple[str, str]) -> None:
    url, alone = servers
    texts = split_data(read_spec(TOPICS), "test")[0][:24]
    together = predictions(url, texts, "bbc-topic-minilm")
    assert together == predictions(alone, texts)  # labels, exits and every score
    assert {p["label"] for p in together} <= set(read_spec(TOPICS).labels)
    sentiment = predictions(url, ["a gripping, beautifully acted film."])
    assert sentiment[0]["label"] == "positive" and sentiment[0]["num_layers"] == 6


def test_the_triton_client_infers_on_both(servers: tuple[str, str]) -> None:
    httpclient = pytest.importorskip("tritonclient.http")
    url, _ = servers
    client = httpclient.InferenceServerClient(url.removeprefix("http://"))
    try:
        texts = ["dull and far too long.", "shares fell as the bank cut its forecast."]
        for model in ("rt-sentiment-minilm", "bbc-topic-minilm"):
            assert client.is_model_ready(model)
            inp = httpclient.InferInput("text", [len(texts)], "BYTES")
            inp.set_data_from_numpy(np.array(texts, dtype=object))
            result = client.infer(model, [inp])
            labels = [x.decode() if isinstance(x, bytes) else x for x in result.as_numpy("label")]
            assert labels == [p["label"] for p in predictions(url, texts, model)]
        index = client.get_model_repository_index()
        assert [(m["name"], m["state"]) for m in index] == [
            ("rt-sentiment-minilm", "READY"),
            ("bbc-topic-minilm", "READY"),
        ]
    finally:
        client.close()


def test_metrics_carry_both_names(servers: tuple[str, str]) -> None:
    url, _ = servers
    predictions(url, ["fine."])
    predictions(url, ["the match ended in a draw."], "bbc-topic-minilm")
    m = metric_samples(httpx.get(f"{url}/metrics", timeout=10).text)
    for model in ("rt-sentiment-minilm", "bbc-topic-minilm"):
        assert sample(m, "exitserve_exits_total", model=model) >= 1
        assert sample(m, "exitserve_ready", model=model) == 1
    info = httpx.get(f"{url}/info", timeout=10).json()
    assert [x["model"] for x in info["models"]] == ["rt-sentiment-minilm", "bbc-topic-minilm"]
    # A process each (the default isolation), the server's 2 threads split between them.
    assert info["shares"]["threads"] == {"rt-sentiment-minilm": 1, "bbc-topic-minilm": 1}
