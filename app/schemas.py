"""Request and response bodies of the REST API."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Parameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    threshold: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="Minimum confidence to leave at an intermediate exit; overrides the"
        " calibrated thresholds. 1.0 = always full depth, 0.0 = always the first exit.",
    )
    max_layers: int | None = Field(None, ge=1, description="Answer at this exit at the latest.")
    all_scores: bool = Field(False, description="Include every label's probability.")
    top_k: int | None = Field(
        None,
        ge=1,
        strict=True,
        description="Include the k best labels' scores, best first (in `scores`).",
    )
    raw_scores: bool = Field(
        False, description="Scores as the exit's logits rather than probabilities."
    )
    label_threshold: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        allow_inf_nan=False,
        description="Multi-label models: a label is on at this probability or above"
        " (default 0.5); `labels` lists the labels that are on.",
    )
    truncate: bool = Field(
        True,
        description="Cut a text over the model's token limit; false: answer 413 naming its"
        " length and the limit.",
    )
    truncation_direction: Literal["right", "left"] = Field(
        "right", description="Which end of a long text is cut: right keeps its start."
    )
    timeout_ms: int | None = Field(
        None,
        ge=1,
        strict=True,  # an integer: no `true`, no "250", no 2.5
        description="Deadline in milliseconds, capped by the server's maximum: inputs still"
        " queued when it passes are dropped and the request is answered 504.",
    )


def check_text(t: str) -> str:
    """The texts every route accepts: non-blank, and encodable as UTF-8."""
    if not t.strip():
        raise ValueError("text is empty or whitespace only")
    try:
        t.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError("text is not valid Unicode (it holds a lone surrogate)") from e
    return t


class PredictRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"inputs": ["a gripping, beautifully acted film"], "parameters": {"threshold": 0.9}}
            ]
        },
    )

    inputs: str | list[str] = Field(..., description="One text or a list of texts.")
    parameters: Parameters = Field(default_factory=Parameters)
    model: str | None = Field(
        None, max_length=256, description="Which model answers (default: the server's first)."
    )

    @field_validator("inputs")
    @classmethod
    def _non_empty(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list):
            if not v:
                raise ValueError("inputs is an empty list")
            for t in v:
                check_text(t)
            return v
        return check_text(v)

    def texts(self) -> list[str]:
        return [self.inputs] if isinstance(self.inputs, str) else list(self.inputs)


class PredictionOut(BaseModel):
    label: str = Field(..., description="The most probable label.")
    score: float = Field(..., description="Its probability (its logit with raw_scores).")
    exit_layer: int = Field(..., description="1 = the exit after the first encoder layer")
    num_layers: int
    scores: dict[str, float] | None = Field(
        None,
        description="With all_scores: every label's score, in label order; with top_k: the"
        " k best, best first.",
    )
    labels: list[str] | None = Field(
        None, description="Multi-label models: the labels that are on, most probable first."
    )


class PredictResponse(BaseModel):
    model: str
    model_version: str
    predictions: list[PredictionOut]


class ErrorResponse(BaseModel):
    error: str
    error_type: str


class InfoResponse(BaseModel):
    model: str
    model_version: str
    labels: list[str]
    architecture: str = "bert"  # the encoder family it was read from
    multi_label: bool = False  # a sigmoid per label: answers are sets of labels
    num_layers: int
    exit_thresholds: list[float]
    confidence: str = "max_softmax"  # what the thresholds are compared with (exit_rule)
    max_seq_len: int
    calibration: dict[str, object]
    evaluation: dict[str, object]
    device: str
    dtype: str
    # The contract: with batch_invariant true, a text's label, exit layer and score are
    # bit-identical alone or in any batch, with any workers, static or continuous batching.
    batch_invariant: bool
    scheme: str  # the numerics: how weights and activations are represented
    kernel: str  # what runs the layers: "onnxruntime" graphs or "torch" ops (same numerics)
    # Per batch, layer by layer or the whole network in one pass (app.engine.dispatch).
    dispatch: dict[str, object] = Field(default_factory=dict)
    # The load controller: latency target, accuracy floor, the ladder it moves along
    # and where it is now (see app.engine.adapt).
    adaptation: dict[str, object]
    # The online audit of early answers (app.engine.audit): its live bound against
    # calibration's promise, the strictness level and thresholds in use; null when off.
    audit: dict[str, object] | None = None
    threads: int  # torch threads per worker
    workers: int  # engine workers, each running its own batches
    max_batch_size: int
    max_queue_delay_ms: float
    max_queue_size: int
    max_inputs_per_request: int
    version: str
    # Every model the server is configured with, the default first: the fields above
    # for each loaded one, with its repository state; the top level is the default's.
    models: list[dict[str, object]] = Field(default_factory=list)
    # How the models share the cores when several want them (app.engine.shares).
    shares: dict[str, object] | None = None
