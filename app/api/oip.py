"""Open Inference Protocol (KServe v2 / Triton HTTP), so their clients work unchanged.

Input `text` (BYTES, shape [N]); outputs `label` (BYTES), `score` (FP32) and
`exit_layer` (INT32), and on request `scores` (FP32 [N, C], every label's in label
order; with Triton's classification extension, `classification: k` on the requested
output or the request parameter `top_k`, BYTES [N, k] of "score:index:label", best
first) and, for a multi-label model, `labels` (BYTES [N], the labels that are on,
joined by ","; among the defaults). Request `parameters` may carry `threshold`,
`max_layers`, `raw_scores`, `label_threshold`, `truncate`, `truncation_direction` (as
in /predict), and a deadline: `timeout_ms`, or Triton's `timeout` in microseconds (what
`InferenceServerClient.infer(..., timeout=...)` sends); with both, the sooner counts.
Inputs may use the binary tensor data extension (as `tritonclient` sends by default);
outputs are always JSON, which every client reads.
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.api.deps import RegistryDep, SettingsDep, engine_for, get_registry, require_api_key
from app.api.predict import ERRORS, exit_rule, prediction, timing_headers, truncation
from app.config import Settings
from app.engine.scheduler import Engine
from app.errors import ApiError, InvalidInput, ModelNotFound, TooLarge, clip
from app.http import server_metadata
from app.schemas import Parameters, check_text

router = APIRouter(prefix="/v2")
infer_router = APIRouter(prefix="/v2", dependencies=[Depends(require_api_key)])
repository_router = APIRouter(prefix="/v2/repository", dependencies=[Depends(require_api_key)])

OUTPUTS = {"label": "BYTES", "score": "FP32", "exit_layer": "INT32", "scores": "FP32",
           "labels": "BYTES"}  # fmt: skip
DEFAULT_OUTPUTS = ("label", "score", "exit_layer")
PARAMETERS = ("threshold", "max_layers", "timeout_ms", "top_k", "raw_scores",
              "label_threshold", "truncate", "truncation_direction")  # fmt: skip
HEADER_LENGTH = "inference-header-content-length"


class TensorIn(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any] | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)


class RequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class InferRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    inputs: list[TensorIn]
    outputs: list[RequestedOutput] | None = None


class TensorOut(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any]


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[TensorOut]


async def _engine(request: Request, name: str, version: str | None = None) -> Engine:
    """The engine of model `name`; 404 for a name or version the server does not have."""
    registry = await get_registry(request)
    if version is not None and version != registry.entry(name).version:
        raise ModelNotFound(f"model {clip(name)!r} has no version {clip(version)!r}")
    return await engine_for(request, name)


def _not_ready() -> JSONResponse:
    return JSONResponse({"error": "not ready", "error_type": "unavailable"}, 503)


@router.get("")
async def metadata() -> dict[str, Any]:
    return server_metadata()


@router.get("/health/live")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready", response_model=None)
async def ready(registry: RegistryDep) -> dict[str, bool] | JSONResponse:
    return {"ready": True} if registry.ready else _not_ready()


@router.get("/models/{name}")
@router.get("/models/{name}/versions/{version}")
async def model_metadata(request: Request, name: str, version: str | None = None) -> dict[str, Any]:
    rt = (await _engine(request, name, version)).runtime
    return {
        "name": rt.name,
        "versions": [rt.version],
        "platform": "exitserve_multi_exit",
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [
            {"name": n, "datatype": d, "shape": [-1] if n != "scores" else [-1, len(rt.labels)]}
            for n, d in OUTPUTS.items()
            if n != "labels" or rt.multi_label
        ],
        "parameters": {
            "labels": rt.labels,
            "num_layers": rt.num_layers,
            "architecture": rt.architecture,
            "multi_label": rt.multi_label,
        },
    }


@router.get("/models/{name}/ready", response_model=None)
@router.get("/models/{name}/versions/{version}/ready", response_model=None)
async def model_ready(
    request: Request, name: str, version: str | None = None
) -> dict[str, Any] | JSONResponse:
    engine = await _engine(request, name, version)
    return {"name": name, "ready": True} if engine.ready else _not_ready()


def _decode_bytes_tensor(blob: bytes) -> list[str]:
    """The binary BYTES layout: each element is a little-endian uint32 length, then bytes."""
    out, i = [], 0
    while i < len(blob):
        if i + 4 > len(blob):
            raise InvalidInput("binary BYTES tensor is truncated")
        (n,) = struct.unpack_from("<I", blob, i)
        i += 4
        if i + n > len(blob):
            raise InvalidInput("binary BYTES tensor is truncated")
        out.append(_utf8(blob[i : i + n]))
        i += n
    return out


def _utf8(b: bytes) -> str:
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidInput("input 'text' is not valid UTF-8") from e


def _flatten(data: list[Any]) -> list[Any]:
    out: list[Any] = []
    for x in data:
        out.extend(_flatten(x) if isinstance(x, list) else [x])
    return out


async def _parse(request: Request) -> tuple[InferRequest, bytes]:
    body = await request.body()
    header_len = request.headers.get(HEADER_LENGTH)
    binary = b""
    if header_len is not None:
        try:
            n = int(header_len)
        except ValueError as e:
            raise InvalidInput(f"{HEADER_LENGTH} is not an integer") from e
        if not 0 <= n <= len(body):
            raise InvalidInput(f"{HEADER_LENGTH} is out of range")
        body, binary = body[:n], body[n:]
    try:
        raw = json.loads(body)
        req = InferRequest.model_validate(raw)
    except (json.JSONDecodeError, RecursionError) as e:
        raise InvalidInput("request body is not valid JSON") from e
    except UnicodeDecodeError as e:
        raise InvalidInput("request body is not valid UTF-8") from e
    except ValidationError as e:
        loc = ".".join(clip(x) for x in e.errors()[0].get("loc", ()))
        raise InvalidInput(f"{loc}: {e.errors()[0].get('msg', 'invalid')}") from e
    return req, binary


def _texts(req: InferRequest, binary: bytes) -> list[str]:
    if len(req.inputs) != 1 or req.inputs[0].name != "text":
        raise InvalidInput("expected exactly one input, named 'text'")
    t = req.inputs[0]
    if t.datatype != "BYTES":
        raise InvalidInput(f"input 'text' must have datatype BYTES, got {clip(t.datatype)!r}")
    size = t.parameters.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size < 0 or size > len(binary):
            raise InvalidInput("binary_data_size does not match the binary data sent")
        texts = _decode_bytes_tensor(binary[:size])
    elif t.data is not None:
        texts = []
        for x in _flatten(t.data):
            if not isinstance(x, str):
                raise InvalidInput("input 'text' must hold strings")
            texts.append(x)
    else:
        raise InvalidInput("input 'text' has no data")
    n = 1
    for d in t.shape:
        n *= d
    if n != len(texts) or any(d < 0 for d in t.shape):
        shape = clip(t.shape)
        raise InvalidInput(f"input 'text' has shape {shape} but {len(texts)} elements")
    if not texts:
        raise InvalidInput("input 'text' is empty")
    for x in texts:
        try:
            check_text(x)
        except ValueError as e:
            raise InvalidInput(f"input 'text': {e}") from e
    return texts


def _parameters(raw: dict[str, Any]) -> Parameters:
    """The request parameters this server acts on; others (Triton's among them) are ignored."""
    known = {k: v for k, v in raw.items() if k in PARAMETERS}
    try:
        params = Parameters.model_validate(known)
    except ValidationError as e:
        loc = ".".join(clip(x) for x in e.errors()[0].get("loc", ()))
        raise InvalidInput(f"parameters.{loc}: {e.errors()[0].get('msg', 'invalid')}") from e
    us = raw.get("timeout")
    if us is None:
        return params
    if isinstance(us, bool) or not isinstance(us, int) or us < 1:
        raise InvalidInput("parameters.timeout: must be a positive integer (microseconds)")
    ms = max(1, us // 1000)
    if params.timeout_ms is not None:
        ms = min(ms, params.timeout_ms)
    return params.model_copy(update={"timeout_ms": ms})


@infer_router.post(
    "/models/{name}/infer",
    response_model=InferResponse,
    responses=ERRORS,
    openapi_extra={
        "requestBody": {
            "content": {"application/json": {"schema": InferRequest.model_json_schema()}},
            "required": True,
        }
    },
)
@infer_router.post(
    "/models/{name}/versions/{version}/infer", response_model=InferResponse, include_in_schema=False
)
async def infer(
    request: Request,
    settings: SettingsDep,
    response: Response,
    name: str,
    version: str | None = None,
) -> InferResponse:
    started = time.perf_counter()
    engine = await _engine(request, name, version)
    req, binary = await _parse(request)
    texts = _texts(req, binary)
    if len(texts) > settings.max_inputs_per_request:
        raise TooLarge(
            f"{len(texts)} inputs in one request; the limit is {settings.max_inputs_per_request}"
        )
    params = _parameters(req.parameters)
    rt = engine.runtime
    defaults = (*DEFAULT_OUTPUTS, "labels") if rt.multi_label else DEFAULT_OUTPUTS
    wanted = [o.name for o in req.outputs] if req.outputs else list(defaults)
    available = [o for o in OUTPUTS if o != "labels" or rt.multi_label]
    unknown = [w for w in wanted if w not in available]
    if unknown:
        raise InvalidInput(f"unknown output {clip(unknown[0])!r}; available: {available}")
    top_k = _classification(req.outputs or [], params.top_k)
    answers = await engine.submit(
        texts,
        exit_rule(engine, params.threshold, params.max_layers),
        settings.timeout_s(params.timeout_ms),
        settings.budget_s(params.timeout_ms),
        truncation(params),
    )
    response.headers.update(timing_headers(answers, time.perf_counter() - started))
    # Every label's score only where the `scores` output is asked for; ranked best
    # first only for the classification extension.
    ranked = "scores" in wanted and top_k is not None
    shown = params.model_copy(
        update={"all_scores": "scores" in wanted, "top_k": len(rt.labels) if ranked else None}
    )
    rows = [prediction(a, rt.num_layers, shown, rt.multi_label) for a in answers]
    return InferResponse(
        model_name=rt.name,
        model_version=rt.version,
        id=req.id,
        outputs=[_output(w, rows, rt.labels, top_k) for w in wanted],
    )


def _classification(outputs: list[RequestedOutput], top_k: int | None) -> int | None:
    """k of Triton's classification extension (`classification` on the `scores` output),
    or the request's `top_k`."""
    for o in outputs:
        k = o.parameters.get("classification")
        if o.name == "scores" and k is not None:
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise InvalidInput("outputs.scores.classification: must be a positive integer")
            return k
    return top_k


def _output(
    name: str, rows: list[dict[str, Any]], labels: list[str], top_k: int | None
) -> TensorOut:
    """One output tensor from the answers (`prediction` objects with every score)."""
    n = len(rows)
    if name == "scores" and top_k is not None:
        k = min(top_k, len(labels))
        index = {label: i for i, label in enumerate(labels)}
        data = [
            f"{score}:{index[label]}:{label}"
            for r in rows
            for label, score in list(r["scores"].items())[:k]
        ]
        return TensorOut(name=name, shape=[n, k], datatype="BYTES", data=data)
    if name == "scores":
        data = [r["scores"][label] for r in rows for label in labels]
        return TensorOut(name=name, shape=[n, len(labels)], datatype="FP32", data=data)
    if name == "labels":
        return TensorOut(name=name, shape=[n], datatype="BYTES",
                         data=[",".join(r["labels"]) for r in rows])  # fmt: skip
    return TensorOut(name=name, shape=[n], datatype=OUTPUTS[name], data=[r[name] for r in rows])


# -- Triton's model repository extension ----------------------------------------------
class NotExplicit(ApiError):
    status, error_type = 400, "unsupported"


class IndexRequest(BaseModel):
    ready: bool = False  # only the models ready now


@repository_router.post("/index")
async def repository_index(
    registry: RegistryDep, body: IndexRequest | None = None
) -> list[dict[str, str]]:
    """Every configured model: name, version, state (READY, LOADING, UNLOADING,
    UNAVAILABLE) and the reason for the state."""
    models = registry.index()
    return [m for m in models if m["state"] == "READY"] if body and body.ready else models


def _explicit(settings: Settings) -> None:
    if settings.model_control != "explicit":
        raise NotExplicit("model control is not explicit (EXITSERVE_MODEL_CONTROL=explicit)")


@repository_router.post("/models/{name}/load")
async def repository_load(
    registry: RegistryDep, settings: SettingsDep, name: str
) -> dict[str, Any]:
    """Load a configured model (nothing to do when it is loaded); answers once it serves."""
    _explicit(settings)
    registry.entry(name)  # 404 before any work
    try:
        await asyncio.to_thread(registry.load, name)
    except Exception as e:
        raise LoadFailed(f"failed to load model {clip(name)!r}; see the server log") from e
    return {}


@repository_router.post("/models/{name}/unload")
async def repository_unload(
    registry: RegistryDep, settings: SettingsDep, name: str
) -> dict[str, Any]:
    """Refuse new work for the model, answer what it admitted, then stop it; the other
    models keep serving."""
    _explicit(settings)
    registry.entry(name)
    await asyncio.to_thread(registry.unload, name, settings.drain_timeout_s)
    return {}


class LoadFailed(ApiError):
    status, error_type = 400, "load_failed"
