"""What the engine produces: one record per iteration of an image, the halting selection over
those records, and the final result of a tokenize job. Plain data, shared by the scheduler, the
cache and the Triton front."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class IterationRecord:
    """One iteration of one image: its tokens so far and, when measured, their quality."""

    iteration: int  # 1-based
    token_ids: np.ndarray  # int32, tokens_per_iter * iteration
    l1: float | None = None
    psnr: float | None = None


@dataclass(frozen=True)
class Selection:
    """The answer a target gets from an image's iterations (see `Target.select`)."""

    record: IterationRecord  # the iteration whose tokens are returned
    iterations: int  # iterations the engine runs to reach this answer
    target_met: bool


@dataclass
class TokenizeResult:
    token_ids: np.ndarray
    iterations: int  # iterations run
    selected_iteration: int  # iteration whose tokens are returned
    l1: float | None
    psnr: float | None
    target_met: bool
    pixel_decodes: int
    timings: dict[str, float]
    trajectory: list[IterationRecord] | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])
