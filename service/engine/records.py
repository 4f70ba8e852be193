"""What the engine produces: one record per probe of an image (ALIT: per iteration), the halting
selection over those records, and the final result of a tokenize job. Plain data, shared by the
scheduler, the cache and the Triton front."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class IterationRecord:
    """One probe of one image: its tokens and, when measured, their quality."""

    iteration: int  # the probe's key (ALIT: the 1-based iteration; see model/family.py)
    token_ids: np.ndarray  # int32 (ALIT: tokens_per_iter * iteration of them)
    l1: float | None = None
    psnr: float | None = None
    positions: np.ndarray | None = None  # int32, each id's position, for families whose tokens carry one


@dataclass(frozen=True)
class Selection:
    """The answer a target gets from an image's iterations (see `Target.select`)."""

    record: IterationRecord  # the probe whose tokens are returned
    iterations: int  # probes of the target's ladder the engine runs to reach this answer
    target_met: bool


@dataclass
class TokenizeResult:
    token_ids: np.ndarray
    iterations: int  # probes run (ALIT: iterations)
    selected_iteration: int  # key of the probe whose tokens are returned
    l1: float | None
    psnr: float | None
    target_met: bool
    pixel_decodes: int
    timings: dict[str, float]
    trajectory: list[IterationRecord] | None = None
    positions: np.ndarray | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])
