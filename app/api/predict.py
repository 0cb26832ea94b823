"""POST /predict: classify one text or a list, each leaving at its own exit."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Response

from app.api.deps import EngineDep, SettingsDep, require_api_key
from app.engine.scheduler import Answer, Engine, ExitRule
from app.errors import InvalidInput, TooLarge
from app.schemas import ErrorResponse, PredictionOut, PredictRequest, PredictResponse

router = APIRouter(dependencies=[Depends(require_api_key)])

ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorResponse} for code in (401, 413, 422, 429, 500, 503, 504)
}


def exit_rule(engine: Engine, threshold: float | None, max_layers: int | None) -> ExitRule:
    n = engine.runtime.num_layers
    if max_layers is not None and not 1 <= max_layers <= n:
        raise InvalidInput(f"parameters.max_layers: must be between 1 and {n}")
    return ExitRule(threshold=threshold, max_layers=max_layers)


def set_timing_headers(response: Response, answers: list[Answer], total_s: float) -> None:
    response.headers["x-queue-time"] = f"{1000 * max(a.queue_s for a in answers):.3f}"
    response.headers["x-inference-time"] = f"{1000 * max(a.inference_s for a in answers):.3f}"
    response.headers["x-total-time"] = f"{1000 * total_s:.3f}"


@router.post(
    "/predict", response_model=PredictResponse, response_model_exclude_none=True, responses=ERRORS
)
async def predict(
    body: PredictRequest, engine: EngineDep, settings: SettingsDep, response: Response
) -> PredictResponse:
    started = time.perf_counter()
    texts = body.texts()
    if len(texts) > settings.max_inputs_per_request:
        raise TooLarge(
            f"{len(texts)} inputs in one request; the limit is {settings.max_inputs_per_request}"
        )
    p = body.parameters
    answers = await engine.submit(
        texts, exit_rule(engine, p.threshold, p.max_layers), settings.timeout_s(p.timeout_ms)
    )
    rt = engine.runtime
    set_timing_headers(response, answers, time.perf_counter() - started)
    return PredictResponse(
        model=rt.name,
        model_version=rt.version,
        predictions=[
            PredictionOut(
                label=a.label,
                score=a.score,
                exit_layer=a.exit_layer,
                num_layers=rt.num_layers,
                scores=a.scores if p.all_scores else None,
            )
            for a in answers
        ],
    )
