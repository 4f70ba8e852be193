"""Run a batch through every iteration and measure each iteration's reconstruction.

The one loop that verification (`service/verify.py`), evaluation (`service/training/evaluate.py`),
the benchmark (`service/bench/workload.py`) and the batching tests share:
advance every image one iteration, take that iteration's logits (already decoded by `advance` when
2D-token halting is on, decoded here otherwise), reconstruct the pixels and measure L1 / PSNR
against the input. The engine does not use it: it measures only images whose target needs it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .alit import ALIT, ImageState, StepOutput, quality


@dataclass
class MeasuredStep:
    """One iteration of a batch: the step outputs and what their tokens reconstruct to."""

    steps: list[StepOutput]
    logits: torch.Tensor  # (B, G, V)
    recon: torch.Tensor  # (B, 3, H, W), unclamped (as L1 is measured)
    l1: torch.Tensor  # (B,)
    psnr: torch.Tensor  # (B,)


def step_logits(model: ALIT, steps: Sequence[StepOutput]) -> torch.Tensor:
    """(B, G, V) logits of one `advance()` result: decoded there already when 2D-token halting is
    on, decoded here otherwise."""
    decoded = [s.logits for s in steps if s.logits is not None]
    if len(decoded) == len(steps):
        return torch.stack(decoded)
    return model.decode_logits([s.token_ids for s in steps])


def measure_step(model: ALIT, steps: Sequence[StepOutput], images: torch.Tensor) -> MeasuredStep:
    """Logits, reconstruction and quality of one `advance()` result against its input images."""
    logits = step_logits(model, steps)
    recon = model.reconstruct(logits)
    l1, psnr = quality(recon, images)
    return MeasuredStep(list(steps), logits, recon, l1, psnr)


def iterate_and_measure(model: ALIT, images: torch.Tensor, halting: bool = False, threshold: float | None = None,
                        draws: Sequence[torch.Tensor] | None = None, trace: bool = False,
                        states: list[ImageState] | None = None) -> Iterator[MeasuredStep]:
    """Every iteration for a batch (B, 3, H, W) in [0, 1], one `MeasuredStep` per iteration, lazily.

    `draws` (one (B, G) 0/1 tensor per iteration) injects 2D-token halting draws; `states` continues
    images already prepared (default: `model.prepare(images)`)."""
    states = model.prepare(images) if states is None else states
    k = 0
    while not states[0].finished:
        inject = None if draws is None else list(torch.as_tensor(draws[k]))
        steps = model.advance(states, halting=halting, threshold=threshold, draws=inject, trace=trace)
        yield measure_step(model, steps, images)
        k += 1
