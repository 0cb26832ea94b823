"""GET /info (what is loaded and how it is configured) and GET /metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app import __version__
from app.api.deps import EngineDep, MetricsDep, SettingsDep
from app.schemas import InfoResponse

router = APIRouter()


@router.get("/info", response_model=InfoResponse)
async def info(engine: EngineDep, settings: SettingsDep) -> InfoResponse:
    rt = engine.runtime
    return InfoResponse(
        model=rt.name,
        model_version=rt.version,
        labels=rt.labels,
        num_layers=rt.num_layers,
        exit_thresholds=rt.thresholds,
        max_seq_len=rt.max_seq_len,
        calibration={k: v for k, v in rt.calibration.items() if k != "path"},
        evaluation=rt.evaluation,
        device=rt.device,
        dtype=rt.dtype,
        batch_invariant=rt.batch_invariant,
        scheme=rt.scheme,
        threads=rt.threads,
        workers=engine.workers,
        max_batch_size=engine.max_batch_size,
        max_queue_delay_ms=engine.max_queue_delay_s * 1000,
        max_queue_size=engine.max_queue_size,
        max_inputs_per_request=settings.max_inputs_per_request,
        version=__version__,
    )


@router.get("/metrics", response_class=Response)
async def metrics(m: MetricsDep) -> Response:
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
