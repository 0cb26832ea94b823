"""The engine's domain errors; the API maps each to a status code (`app.errors`)."""

from __future__ import annotations


class EngineError(Exception):
    """Base of the engine's domain errors."""


class Overloaded(EngineError):
    """The engine cannot take the request's inputs now: its queue is full, or it could
    not answer them within their budget."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s  # when a retry could be served in time


class TooLate(Overloaded):
    """The queue has room, but the load controller expects the request's inputs to be
    answered only after its budget, even at the lowest operating point allowed."""


class Draining(EngineError):
    """The engine is shutting down and takes no new work."""


class NotRunning(EngineError):
    """The engine has not started, or its worker has stopped."""


class InferenceFailed(EngineError):
    """The batch holding this input failed; the engine itself keeps running."""


class InputTooLong(EngineError):
    """An input is over the model's token limit and its request forbade truncating it."""

    def __init__(self, length: int, limit: int) -> None:
        super().__init__(f"an input has {length} tokens; the model's limit is {limit}")
        self.length, self.limit = length, limit


class DeadlineExceeded(EngineError):
    """The request's deadline passed before all of its inputs could start."""


class UnknownModel(EngineError):
    """The server has no model of that name."""

    def __init__(self, name: str, served: list[str]) -> None:
        super().__init__(f"no model named {name!r}")
        self.name, self.served = name, served
