"""The load test's request mix and response checks (used by the root `locustfile.py`).

Kept free of locust on purpose: importing locust monkey-patches the whole process for
gevent, so the locustfile holds only the Locust glue and the tests import this module.

A corpus is the test split of the served model, cut at the median length into short
and long texts. `plan` builds one `/predict` request and says what its answer must
look like; `check_predict` and `check_info` return None for a good answer, else the
reason it is wrong (the message Locust records as the failure).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard


@dataclass(frozen=True)
class Corpus:
    model: str
    labels: tuple[str, ...]
    num_layers: int
    short: tuple[str, ...]  # test-split texts up to the median length
    long: tuple[str, ...]  # the rest


def split_by_length(texts: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Short and long halves at the median length; one text makes both halves."""
    if not texts:
        raise ValueError("no texts to load-test with")
    ordered = sorted(texts, key=len)
    half = len(ordered) // 2
    return tuple(ordered[: max(half, 1)]), tuple(ordered[half:])


def load_corpus(model_dir: Path) -> Corpus:
    """The model's name, labels and depth, and its test-split texts, from model.json."""
    from app.network.artifact import read_spec
    from app.training.evaluate import split_data

    spec = read_spec(Path(model_dir))
    texts, _ = split_data(spec, "test")
    short, long = split_by_length(texts)
    return Corpus(spec.name, tuple(spec.labels), spec.config.num_layers, short, long)


@dataclass(frozen=True)
class Planned:
    """One `/predict` request and what its answer must satisfy."""

    name: str  # its row in Locust's statistics
    body: dict[str, Any]
    count: int  # inputs sent, so predictions expected
    threshold: float | None = None
    max_layers: int | None = None
    all_scores: bool = False


def plan(
    corpus: Corpus,
    rng: random.Random,
    name: str,
    *,
    size: int = 1,
    long: bool | None = None,
    threshold: float | None = None,
    max_layers: int | None = None,
    all_scores: bool = False,
) -> Planned:
    """`size` texts (one is sent as a bare string, more as a list), short, long or
    either (`long=None`), with the given parameters."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    pools = [corpus.short, corpus.long] if long is None else [corpus.long if long else corpus.short]
    texts = [rng.choice(rng.choice(pools)) for _ in range(size)]
    params: dict[str, Any] = {}
    if threshold is not None:
        params["threshold"] = threshold
    if max_layers is not None:
        params["max_layers"] = max_layers
    if all_scores:
        params["all_scores"] = True
    body: dict[str, Any] = {"inputs": texts[0] if size == 1 else texts}
    if params:
        body["parameters"] = params
    return Planned(name, body, size, threshold, max_layers, all_scores)


def _model_document(status: int, body: bytes | str | None, corpus: Corpus) -> dict[str, Any] | str:
    """The 200 JSON object about `corpus.model`, or what is wrong with the response."""
    if status != 200:
        return f"status {status}"
    try:
        doc = json.loads(body or b"")
    except (ValueError, UnicodeDecodeError):
        return "body is not JSON"
    if not isinstance(doc, dict):
        return "body is not a JSON object"
    if doc.get("model") != corpus.model:
        return f"model {doc.get('model')!r}, expected {corpus.model!r}"
    return doc


def _is_int(x: object) -> TypeGuard[int]:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> TypeGuard[float]:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def check_predict(
    req: Planned, status: int, body: bytes | str | None, corpus: Corpus
) -> str | None:
    doc = _model_document(status, body, corpus)
    if isinstance(doc, str):
        return doc
    preds = doc.get("predictions")
    if not isinstance(preds, list):
        return "no predictions list"
    if len(preds) != req.count:
        return f"{len(preds)} predictions for {req.count} inputs"
    n = corpus.num_layers
    deepest = min(n, req.max_layers or n)
    for i, p in enumerate(preds):
        problem = _check_prediction(req, p, corpus, n, deepest)
        if problem:
            return f"prediction {i}: {problem}"
    return None


def _check_prediction(req: Planned, p: object, corpus: Corpus, n: int, deepest: int) -> str | None:
    if not isinstance(p, dict):
        return "not an object"
    if p.get("label") not in corpus.labels:
        return f"label {p.get('label')!r} not among {list(corpus.labels)}"
    score = p.get("score")
    if not _is_number(score) or not 0.0 <= score <= 1.0:
        return f"score {score!r} not in [0, 1]"
    layer = p.get("exit_layer")
    if not _is_int(layer) or not 1 <= layer <= deepest:
        return f"exit_layer {layer!r} outside 1..{deepest}"
    if p.get("num_layers") != n:
        return f"num_layers {p.get('num_layers')!r}, expected {n}"
    if req.threshold == 1.0 and layer != deepest:
        return f"threshold 1.0 left at exit {layer}, not {deepest}"
    if req.threshold == 0.0 and layer != 1:
        return f"threshold 0.0 left at exit {layer}, not 1"
    scores = p.get("scores")
    if not req.all_scores:
        return None if scores is None else "scores sent unasked"
    if not isinstance(scores, dict) or set(scores) != set(corpus.labels):
        return f"scores {scores!r} do not cover the labels"
    if not all(_is_number(s) for s in scores.values()):
        return "scores hold a non-number"
    if abs(sum(scores.values()) - 1.0) > 1e-2:
        return f"scores sum to {sum(scores.values()):.4f}"
    if scores[p["label"]] < max(scores.values()):
        return f"label {p['label']!r} is not the top score"
    return None


def check_info(status: int, body: bytes | str | None, corpus: Corpus) -> str | None:
    """`/info` must describe the model the requests were drawn for."""
    doc = _model_document(status, body, corpus)
    if isinstance(doc, str):
        return doc
    if doc.get("labels") != list(corpus.labels):
        return f"labels {doc.get('labels')!r}, expected {list(corpus.labels)}"
    if doc.get("num_layers") != corpus.num_layers:
        return f"num_layers {doc.get('num_layers')!r}, expected {corpus.num_layers}"
    return None
