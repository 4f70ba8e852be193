"""The engine interface: what the API (and Triton's model) may use of an engine. Two
implementations: the in-process `Engine` (workers.py) and the Triton front `TritonEngine`
(triton_client.py), which forwards tokenize calls to a Triton Inference Server."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from ..model.checkpoint import LoadedModel
from .observer import EngineObserver
from .records import IterationRecord, TokenizeResult
from .targets import Limits, Target


@runtime_checkable
class EngineInterface(Protocol):
    loaded: LoadedModel
    limits: Limits
    observer: EngineObserver
    accepting: bool  # False while draining or stopped: submissions raise EngineStopped
    workers: list  # the in-process workers (one per device; Triton's front: its local /reconstruct worker)

    def start(self) -> Any: ...
    def shutdown(self) -> None: ...
    async def drain(self, timeout: float) -> bool:
        """Stop accepting; wait until queued and running work is done. False on timeout."""
        ...

    @property
    def ready(self) -> bool: ...  # started, warm, healthy and accepting
    @property
    def live(self) -> bool: ...  # False once it cannot recover (a worker died): restart the process
    @property
    def problem(self) -> str: ...  # why not ready, "" when ready
    @property
    def busy(self) -> bool: ...  # work queued or running
    def retry_after(self) -> float: ...  # seconds until a refused submission may succeed
    async def tokenize(self, image: torch.Tensor, target: Target, deadline: float | None = None,
                       trajectory: bool = False, progress: Callable[[IterationRecord], None] | None = None,
                       tag: str | None = None) -> TokenizeResult: ...
    async def reconstruct(self, token_ids: list[np.ndarray] | list[list[int]], deadline: float | None = None,
                          positions: list | None = None) -> list[torch.Tensor]: ...
