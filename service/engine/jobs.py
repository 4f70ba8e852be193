"""Units of work the engine accepts: a tokenize job (an image and its target) or a reconstruct job
(token ids). Each carries a thread-safe future, its deadline and the state the scheduler keeps for
it while it runs."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

import torch

from .records import IterationRecord
from .targets import Target


@dataclass(eq=False)
class Job:
    """One unit of work. Its future is awaited from asyncio via `asyncio.wrap_future` (cancelling
    the awaiting task cancels it) or waited on directly (warm-up, Triton, benchmarks)."""

    deadline: float | None = None  # time.monotonic() seconds
    future: Future = field(default_factory=Future)
    submitted: float = field(default_factory=time.monotonic)
    admitted: float | None = None
    tag: str | None = None  # free-form label (fault-injection tests, tracing)
    # Asked once per step when set: False means the caller went away (Triton's request cancellation)
    # and the job is cancelled like an abandoned HTTP request.
    still_wanted: Callable[[], bool] | None = None

    @property
    def cancelled(self) -> bool:
        if self.still_wanted is not None and not self.future.done() and not self.still_wanted():
            self.future.cancel()
        return self.future.cancelled()

    def resolve(self, value: Any) -> None:
        with contextlib.suppress(InvalidStateError):  # cancelled meanwhile
            self.future.set_result(value)

    def fail(self, exc: BaseException) -> None:
        with contextlib.suppress(InvalidStateError):
            self.future.set_exception(exc)

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now > self.deadline


@dataclass(eq=False)
class TokenizeJob(Job):
    image: torch.Tensor | None = None  # (3, H, W) in [0, 1]
    target: Target = field(default_factory=Target)
    want_trajectory: bool = False
    progress: Callable[[IterationRecord], None] | None = None  # called from the worker thread
    state: Any = None  # the family's per-image state while it runs (model/family.py)
    records: dict[int, IterationRecord] = field(default_factory=dict)  # by probe key, while it runs
    pixel_decodes: int = 0
    compute_started: float | None = None

    @property
    def running(self) -> Any:
        """Its state while admitted and not retired (the scheduler's invariant)."""
        assert self.state is not None, "a job that is not running has no state"
        return self.state


@dataclass(eq=False)
class ReconstructJob(Job):
    token_ids: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # (n,) int64
    positions: torch.Tensor | None = None  # (n,) int64, for families whose tokens carry positions
