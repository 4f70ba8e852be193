"""Typed engine failures. The API maps each to one HTTP status; none of them loses other requests."""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every failure the engine reports for a request."""


class QueueFull(EngineError):
    """The admission queue is at capacity (-> 503 + Retry-After)."""

    def __init__(self, depth: int, retry_after: float):
        super().__init__(f"admission queue full ({depth} waiting); retry in about {retry_after:.0f} s")
        self.depth = depth
        self.retry_after = retry_after


class DeadlineExceeded(EngineError):
    """The request's deadline passed before it finished (-> 504)."""


class StepFailed(EngineError):
    """The compute step holding this image raised; the worker keeps serving (-> 500, a bug)."""


class EngineStopped(EngineError):
    """The engine is draining or stopped and takes no new work (-> 503)."""


class EngineUnavailable(EngineError):
    """The remote engine (Triton) cannot be reached or serves another model, or no worker thread of
    the in-process engine is left alive (-> 503 + Retry-After)."""
