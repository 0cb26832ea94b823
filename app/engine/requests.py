"""What the engine hands back and reports: an input's answer, the observer of what the
engine did, and the record of an admitted input while it waits and runs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from app.network.exit_rule import ExitRule
from app.network.tokenizer import TRUNCATE, Truncation


class EngineObserver(Protocol):
    """Receives what the engine did; the metrics module implements it."""

    def answered(
        self, exit_layer: int, num_layers: int, queue_s: float, inference_s: float
    ) -> None: ...

    def layer_steps(self, rows_per_layer: Sequence[int]) -> None: ...

    def load(self, queued: int, inflight: int) -> None: ...

    def audited(self, answers: int, disagreed: int, layers: int) -> None: ...

    def threshold_moved(self, direction: str) -> None: ...


@dataclass(frozen=True)
class Answer:
    label: str
    score: float
    exit_layer: int
    scores: dict[str, float]  # every label's probability (softmax, or sigmoid each)
    queue_s: float
    inference_s: float
    # The load controller's operating point the input was served at (0: calibrated);
    # None when the request chose its own threshold or depth cap.
    operating_point: int | None = 0
    logits: tuple[float, ...] = ()  # the exit's raw scores, in label order


class Pending:
    __slots__ = (
        "admitted",
        "deadline",
        "future",
        "loop",
        "point",
        "rule",
        "started",
        "taken",
        "text",
        "tokens",
        "truncation",
    )

    def __init__(
        self,
        text: str,
        rule: ExitRule,
        loop: asyncio.AbstractEventLoop,
        deadline: float,
        truncation: Truncation = TRUNCATE,
    ) -> None:
        self.text = text
        self.rule = rule
        self.truncation = truncation
        self.loop = loop
        self.future: asyncio.Future[Answer] = loop.create_future()
        self.admitted = time.perf_counter()
        self.deadline = deadline  # perf_counter time; inf: none
        self.taken = False  # in a batch: it will run to its answer
        self.started = 0.0
        self.point: int | None = 0  # operating point its batch ran it at
        self.tokens: list[int] = []  # its token ids, once its batch has begun


def settle(fut: asyncio.Future[Answer], answer: Answer | None, error: Exception | None) -> None:
    if fut.done():  # the client went away and the request was cancelled
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(answer)  # type: ignore[arg-type]


def raise_first_error(futures: list[asyncio.Future[Answer]]) -> None:
    for f in futures:
        if f.done() and not f.cancelled() and f.exception() is not None:
            raise f.exception()  # type: ignore[misc]
