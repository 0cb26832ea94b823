"""GET /info (what is loaded and how it is configured) and GET /metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app import __version__
from app.api.deps import MetricsDep, RegistryDep, SettingsDep
from app.config import Settings
from app.engine.scheduler import Engine
from app.schemas import InfoResponse

router = APIRouter()


def adaptation(engine: Engine, settings: Settings) -> dict[str, object]:
    c = engine.controller
    state = engine.adaptation() or {}
    return {
        "latency_target_ms": settings.latency_target_ms,
        "max_accuracy_drop": settings.max_accuracy_drop,
        # Refuses by expected wait (a target is set) / moves to shallower points (a
        # floor, the shallowest point allowed, past point 0 too).
        "admission": c is not None and c.enabled,
        "moves": c is not None and c.enabled and c.shallowest > 0,
        "floor": 0 if c is None else c.shallowest,
        "point": int(state.get("point", 0)),
        "expected_wait_ms": round(1000 * state.get("expected_wait_s", 0.0), 3),
        "ladder": [
            {
                "thresholds": list(p.thresholds),
                "accuracy": p.accuracy,
                "mean_layers": p.mean_layers,
                "relative_cost": p.relative_cost,
            }
            for p in (engine.runtime.ladder if c is None else c.ladder).points
        ],
    }


def dispatch(engine: Engine) -> dict[str, object]:
    """How batches run (app.engine.dispatch): the mode, and under auto the costs measured
    at start-up and the plan they give at each measured size."""
    rt = engine.runtime
    out: dict[str, object] = {"mode": rt.dispatch}
    if rt.backend.graphs_captured:
        out["graphs_captured"] = rt.backend.graphs_captured
    if rt.costs is not None:
        c = rt.costs
        out["costs_ms"] = {
            "rows": list(c.sizes),
            "whole": [round(1000 * t, 4) for t in c.whole],
            "layer_step": [round(1000 * t, 4) for t in c.layer],
        }
        out["plan"] = {str(b): rt.plan(b) for b in c.sizes}
        out["rows_alive_before_each_layer"] = rt.alive
    return out


def model_info(engine: Engine, settings: Settings) -> dict[str, object]:
    """What /info says about one loaded model."""
    rt = engine.runtime
    return {
        "model": rt.name,
        "model_version": rt.version,
        "labels": rt.labels,
        "architecture": rt.architecture,
        "multi_label": rt.multi_label,
        "num_layers": rt.num_layers,
        "exit_thresholds": rt.thresholds,
        "confidence": rt.confidence,
        "max_seq_len": rt.max_seq_len,
        "calibration": {k: v for k, v in rt.calibration.items() if k != "path"},
        "evaluation": rt.evaluation,
        "device": rt.device,
        "dtype": rt.dtype,
        "batch_invariant": rt.batch_invariant,
        "scheme": rt.scheme,
        "kernel": rt.kernel,
        "dispatch": dispatch(engine),
        "adaptation": adaptation(engine, settings),
        "audit": None if engine.audit is None else engine.audit.state(),
        "threads": rt.threads,
        "workers": engine.workers,
        "max_batch_size": engine.max_batch_size,
        "max_queue_delay_ms": engine.max_queue_delay_s * 1000,
        "max_queue_size": engine.max_queue_size,
        "max_inputs_per_request": settings.max_inputs_per_request,
    }


@router.get("/info", response_model=InfoResponse)
async def info(registry: RegistryDep, settings: SettingsDep) -> InfoResponse:
    models: list[dict[str, object]] = []
    loaded: dict[str, dict[str, object]] = {}
    for entry in registry.index():
        engine = registry.find(entry["name"])
        described: dict[str, object] = {"model": entry["name"], "model_version": entry["version"]}
        if engine is not None:
            described = loaded[entry["name"]] = model_info(engine, settings)
        models.append({**described, "state": entry["state"], "reason": entry["reason"]})
    shares, policy = registry.shares, None
    if shares is not None:
        policy = {
            "policy": "weighted fair share of layer steps",
            "slots": shares.slots,
            "weights": {name: shares.weight(name) for name in registry.names},
            "half_life_s": shares.half_life_s,
        }
    # The default model's figures (unloaded: 503 from `engine`, as for /predict).
    default = loaded.get(registry.default) or model_info(registry.engine(), settings)
    return InfoResponse.model_validate(
        {**default, "version": __version__, "models": models, "shares": policy}
    )


@router.get("/metrics", response_class=Response)
async def metrics(m: MetricsDep) -> Response:
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
