"""POST /predict: classify one text or a list, each leaving at its own exit.

The hot path of the service, kept lean: one dependency (the API key), the engine and
settings read from app.state, and the answer serialized once, straight to JSON bytes.
`response_model` still documents the body in the OpenAPI schema, and the tests check
every answer against it; FastAPI passes a returned Response through without
re-validating it, which took a tenth of the event loop's time per request.
"""

from __future__ import annotations

import json
import time
from typing import Any

from fastapi import APIRouter, Depends, Request, Response

from app.api.deps import engine_for, require_api_key
from app.config import Settings
from app.engine.requests import Answer
from app.engine.scheduler import Engine
from app.errors import InvalidInput, TooLarge
from app.network.exit_rule import ExitRule
from app.network.tokenizer import Truncation
from app.schemas import ErrorResponse, Parameters, PredictRequest, PredictResponse

router = APIRouter(dependencies=[Depends(require_api_key)])

ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorResponse} for code in (401, 413, 422, 429, 500, 503, 504)
}


def exit_rule(engine: Engine, threshold: float | None, max_layers: int | None) -> ExitRule:
    """The request's rule, checked against the model (`ExitRule.check`): 422 naming the
    parameter when it does not fit."""
    rule = ExitRule(threshold=threshold, max_layers=max_layers)
    try:
        rule.check(engine.runtime.num_layers)
    except ValueError as e:
        raise InvalidInput(f"parameters.{e}") from None
    return rule


def timing_headers(answers: list[Answer], total_s: float) -> dict[str, str]:
    """Timing in milliseconds, and the operating point the answers were served at (the
    lowest of them; absent when the request chose its own threshold or depth cap)."""
    headers = {
        "x-queue-time": f"{1000 * max((a.queue_s for a in answers), default=0.0):.3f}",
        "x-inference-time": f"{1000 * max((a.inference_s for a in answers), default=0.0):.3f}",
        "x-total-time": f"{1000 * total_s:.3f}",
    }
    points = [a.operating_point for a in answers if a.operating_point is not None]
    if points:
        headers["x-operating-point"] = str(max(points))
    return headers


def prediction(
    a: Answer, num_layers: int, p: Parameters, multi_label: bool = False
) -> dict[str, Any]:
    """One answer as PredictionOut's JSON object: `scores` only when asked for (every
    label in label order, or the `top_k` best, best first), logits in place of probabilities with
    `raw_scores`, and a multi-label model's `labels` that are on."""
    scores = a.scores
    if p.raw_scores:
        scores = dict(zip(a.scores, a.logits, strict=True))
    out: dict[str, Any] = {
        "label": a.label,
        "score": scores[a.label],
        "exit_layer": a.exit_layer,
        "num_layers": num_layers,
    }
    if p.top_k is not None:
        ranked = sorted(scores.items(), key=lambda kv: -a.scores[kv[0]])
        out["scores"] = dict(ranked[: p.top_k])
    elif p.all_scores:
        out["scores"] = scores
    if multi_label:
        at = 0.5 if p.label_threshold is None else p.label_threshold
        on = [label for label, prob in a.scores.items() if prob >= at]
        out["labels"] = sorted(on, key=lambda label: -a.scores[label])
    return out


def truncation(p: Parameters) -> Truncation:
    return Truncation(allowed=p.truncate, side=p.truncation_direction)


@router.post(
    "/predict", response_model=PredictResponse, response_model_exclude_none=True, responses=ERRORS
)
async def predict(body: PredictRequest, request: Request) -> Response:
    started = time.perf_counter()
    engine = await engine_for(request, body.model)
    settings: Settings = request.app.state.settings
    texts = body.texts()
    if len(texts) > settings.max_inputs_per_request:
        raise TooLarge(
            f"{len(texts)} inputs in one request; the limit is {settings.max_inputs_per_request}"
        )
    p = body.parameters
    answers = await engine.submit(
        texts,
        exit_rule(engine, p.threshold, p.max_layers),
        settings.timeout_s(p.timeout_ms),
        settings.budget_s(p.timeout_ms),
        truncation(p),
    )
    rt = engine.runtime
    content = {
        "model": rt.name,
        "model_version": rt.version,
        "predictions": [prediction(a, rt.num_layers, p, rt.multi_label) for a in answers],
    }
    return Response(
        json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode(),
        media_type="application/json",
        headers=timing_headers(answers, time.perf_counter() - started),
    )
