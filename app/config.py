"""Service settings, read from `EXITSERVE_*` environment variables."""

from __future__ import annotations

import hmac
import json
import os
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, not the host's core count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def parse_weights(text: str) -> dict[str, float]:
    """`name=weight,...` as a dict; each weight a positive number."""
    out: dict[str, float] = {}
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        name, sep, weight = item.partition("=")
        try:
            value = float(weight)
        except ValueError:
            value = float("nan")
        if not sep or not name.strip() or not 0 < value < float("inf"):
            raise ValueError(f"model weight {item!r}: expected name=positive number")
        out[name.strip()] = value
    return out


def authorized(authorization: str, keys: Sequence[str]) -> bool:
    """True when no keys are configured or the header is `Bearer <one of the keys>`."""
    if not keys:
        return True
    scheme, _, token = authorization.partition(" ")
    given = token.strip().encode()
    # Compare against every key, always, so timing reveals neither key nor position.
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(given, key.encode())
    return scheme.lower() == "bearer" and ok


def named_models(model_dirs: Sequence[Path]) -> list[tuple[str, str, Path]]:
    """(name, version, directory) from each model.json, in order (read as JSON, nothing
    loaded); a duplicate name or an unreadable model.json is refused naming the directory."""
    out: dict[str, tuple[str, str, Path]] = {}
    for d in model_dirs:
        try:
            spec = json.loads((d / "model.json").read_text())
            name, version = str(spec["name"]), str(spec.get("version", "1"))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"model directory {str(d)!r} does not load: {e}") from e
        if name in out:
            raise ValueError(f"two models named {name!r}: {str(out[name][2])!r} and {str(d)!r}")
        out[name] = (name, version, d)
    return list(out.values())


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EXITSERVE_", extra="ignore", frozen=True)

    # One model directory, or several separated by commas: each served under the name in
    # its model.json, the first the default (`model_dirs`).
    model_dir: str = "models/rt-sentiment-minilm"
    # none: every configured model is loaded at start-up and stays; explicit: also the
    # repository routes' load and unload (Triton's model control mode of that name).
    model_control: Literal["none", "explicit"] = "none"
    # Shares of the cores when several models want them at once: `name=weight,...`;
    # a model not named weighs 1 (app.engine.shares).
    model_weights: str = ""
    # With several models: process, each model in a process of its own behind one front
    # end (app.front), sharing the cores by its weight's share of `threads`; thread, all
    # in this process, taking turns at the cores by weighted fair share (app.engine.shares).
    isolation: Literal["process", "thread"] = "process"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # int8a16: int8 weights and products with 16-bit activations (two int8 halves), for
    # classifiers whose answers 8-bit activations change (app.network.quantize).
    quantization: Literal["auto", "int8", "int8a16", "fp16", "bf16", "none"] = "auto"
    # What runs int8 layers on the CPU: onnxruntime (one graph call per layer, fewer ops
    # and GIL hand-offs), torch (eager ops); auto: onnxruntime when installed. Same scheme.
    int8_kernel: Literal["auto", "onnxruntime", "torch"] = "auto"
    threads: int = Field(default_factory=usable_cpus, ge=1, le=256)
    max_batch_size: int = Field(32, ge=1, le=1024)
    max_queue_delay_ms: float = Field(2.0, ge=0.0, le=1000.0)
    max_queue_size: int = Field(256, ge=1, le=1_000_000)
    # static: each batch runs to its last row before the next one starts (measured
    # faster here); continuous: rows from different requests merge at each depth.
    batching: Literal["continuous", "static"] = "static"
    # Per batch: layer by layer (rows leave as they go), or the whole network in one
    # pass (one read of the logits); auto: whichever the costs measured at start-up on
    # the device expect to be cheaper (app.engine.dispatch). On the CPU auto is layers,
    # which won at every batch size measured there.
    dispatch: Literal["auto", "layers", "whole"] = "auto"
    # Engine workers, each running its own batches with threads // workers torch threads.
    # Unset: on the CPU one single-thread worker per thread (measured faster at every
    # load from 4 clients up: a batch of one gains nothing from a second thread, and two
    # batches in flight keep both cores busy while early exits thin each one out); on a
    # GPU, and with continuous batching, one worker.
    workers: int | None = Field(None, ge=1, le=64)
    max_inputs_per_request: int = Field(64, ge=1, le=10_000)
    max_body_bytes: int = Field(1_048_576, ge=1024, le=1 << 30)
    overload_status: Literal[429, 503] = 429
    drain_timeout_s: float = Field(20.0, ge=0.0, le=3600.0)
    # With a process per model: how long a model's process may take to turn ready (a
    # start or an explicit load) before it is killed and the start fails.
    load_timeout_s: float = Field(600.0, gt=0.0, le=86_400.0)
    # Deadlines: a request's `timeout_ms` is capped at the maximum; without one it gets
    # the default. Inputs still queued at their deadline are dropped and answered 504.
    default_timeout_ms: int = Field(30_000, ge=1, le=3_600_000)
    max_timeout_ms: int = Field(60_000, ge=1, le=3_600_000)
    # Adapt to load (app.engine.adapt): the latency a request without its own timeout_ms
    # should get, queue wait plus service; under load the service moves down the model's
    # operating ladder to keep it, and refuses at once (overload status, Retry-After)
    # what it still could not answer in time. 0: no target, no adaptation, no refusal
    # but a full queue's.
    latency_target_ms: float = Field(500.0, ge=0.0, le=600_000.0)
    # How far below the calibrated accuracy (calibration split, a fraction) the ladder
    # may go under load; 0 keeps the calibrated thresholds always.
    max_accuracy_drop: float = Field(0.02, ge=0.0, le=1.0)
    # The online audit (app.engine.audit): a share of the answers at the model's own exits
    # run again through every exit, off the request's path; thresholds tighten when the
    # live bound on disagreement with the last exit passes calibration's promise.
    audit: bool = True
    # The share audited while the server is busy (five times it while idle, none while
    # it serves below its calibrated point).
    audit_rate: float = Field(0.02, ge=0.0, le=1.0)
    # How many of the latest audited answers the live bound is computed over.
    audit_window: int = Field(2000, ge=50, le=1_000_000)
    # A batch running longer than this makes /readyz fail (the engine is stuck).
    stuck_after_s: float = Field(30.0, gt=0.0, le=3600.0)
    api_keys: SecretStr = SecretStr("")
    host: str = "0.0.0.0"
    port: int = Field(8000, ge=1, le=65535)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    # One log line per request: off by default, since the metrics count every request
    # and the line cost 13% of the event loop's time at 16 clients (py-spy).
    access_log: bool = False

    @field_validator("model_dir", mode="before")
    @classmethod
    def _dirs(cls, v: object) -> object:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, list | tuple):
            return ",".join(str(x) for x in v)
        return v

    @field_validator("model_weights")
    @classmethod
    def _weights_parse(cls, v: str) -> str:
        parse_weights(v)
        return v

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, v: object) -> object:
        return v.lower() if isinstance(v, str) else v

    @model_validator(mode="after")
    def _workers_fit(self) -> Settings:
        if self.workers is None:
            return self
        if self.workers > self.threads:
            raise ValueError(f"workers ({self.workers}) exceeds threads ({self.threads})")
        if self.workers > 1 and self.batching == "continuous":
            raise ValueError("continuous batching runs one worker; set workers=1")
        return self

    @model_validator(mode="after")
    def _dispatch_fits_batching(self) -> Settings:
        if self.dispatch == "whole" and self.batching == "continuous":
            raise ValueError(
                "dispatch=whole runs static batches in one pass; continuous batching merges"
                " rows at each layer: set batching=static or dispatch=layers"
            )
        return self

    @model_validator(mode="after")
    def _request_fits_queue(self) -> Settings:
        if self.max_inputs_per_request > self.max_queue_size:
            raise ValueError(
                f"max_inputs_per_request ({self.max_inputs_per_request}) exceeds max_queue_size"
                f" ({self.max_queue_size}): such a request could never be admitted"
            )
        return self

    @model_validator(mode="after")
    def _default_timeout_fits(self) -> Settings:
        if self.default_timeout_ms > self.max_timeout_ms:
            raise ValueError(
                f"default_timeout_ms ({self.default_timeout_ms}) exceeds max_timeout_ms"
                f" ({self.max_timeout_ms})"
            )
        return self

    def timeout_s(self, requested_ms: int | None) -> float:
        """A request's deadline in seconds: its own `timeout_ms`, capped, or the default."""
        ms = self.default_timeout_ms if requested_ms is None else requested_ms
        return min(ms, self.max_timeout_ms) / 1000

    def budget_s(self, requested_ms: int | None) -> float | None:
        """The latency a request asked for (its own `timeout_ms`, capped), against which
        it is admitted; None: it asked for none and the latency target applies."""
        return None if requested_ms is None else self.timeout_s(requested_ms)

    @cached_property
    def model_dirs(self) -> tuple[Path, ...]:
        """The model directories, in order: the first is the default model."""
        dirs = tuple(Path(d.strip()) for d in self.model_dir.split(",") if d.strip())
        if not dirs:
            raise ValueError("EXITSERVE_MODEL_DIR names no model directory")
        return dirs

    @cached_property
    def weights(self) -> dict[str, float]:
        return parse_weights(self.model_weights)

    @cached_property
    def keys(self) -> tuple[str, ...]:
        """The API keys, parsed once: every inference request checks them."""
        return tuple(k.strip() for k in self.api_keys.get_secret_value().split(",") if k.strip())
