"""Admission by measured cost: how many images in flight still buy throughput on this device.

At warm-up a worker times one steady-state step at several numbers n of images in flight: the
VQGAN encode of the images admitted in a step (n / (max_iters / 2) of them: an image stays about
half the iterations), one packed iteration with halting for all n, and their pixel decode. On a GPU the step costs about the same for 1 or 32 images, so
per-image cost falls all the way and every slot is worth filling; on a CPU it is nearly linear, so
past a point more images in flight only stretch everyone's latency for no throughput. The limit is
the smallest count whose per-image cost is within `TOLERANCE` of the best measured: no per-machine
constant to tune, the curve decides.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

TOLERANCE = 0.10  # per-image cost within 10 % of the best measured counts as "as cheap"


@dataclass
class CostCurve:
    step_seconds: dict[int, float] = field(default_factory=dict)  # images in the step -> seconds

    def per_image(self, n: int) -> float:
        return self.step_seconds[n] / n

    def best_per_image(self) -> float:
        return min(self.per_image(n) for n in self.step_seconds)

    def knee(self) -> int:
        """The fewest images in flight whose per-image cost is within TOLERANCE of the best."""
        best = self.best_per_image()
        return min(n for n in self.step_seconds if self.per_image(n) <= best * (1 + TOLERANCE))

    def to_dict(self) -> dict:
        return {"step_seconds": {str(n): s for n, s in sorted(self.step_seconds.items())},
                "per_image_seconds": {str(n): self.per_image(n) for n in sorted(self.step_seconds)},
                "knee": self.knee()}


def sizes_up_to(max_batch: int) -> list[int]:
    out, n = [], 1
    while n < max_batch:
        out.append(n)
        n *= 2
    return [*out, max_batch]


def measure_cost_curve(model, device: str, max_batch: int, halting: bool, repeats: int = 3,
                       iteration: int | None = None) -> CostCurve:
    """Time one steady-state step — the encode of the step's admissions, a packed iteration (with
    halting when on) and the pixel decode of its images — at 1, 2, 4, ... max_batch images, all at
    `iteration` (default: the middle one); the best of `repeats` runs per size. States are restored
    after every run, so nothing is changed."""
    cfg = model.cfg
    k = cfg.max_iters // 2 if iteration is None else iteration
    g = torch.Generator().manual_seed(0)
    images = torch.rand(max_batch, 3, cfg.img_size, cfg.img_size, generator=g).to(device)
    curve = CostCurve()
    with torch.inference_mode():
        states = model.prepare(images)
        for _ in range(k):
            model.advance(states, halting=halting)
        saved = [(s.x, s.iteration) for s in states]
        for n in sizes_up_to(max_batch):
            best = float("inf")
            for _ in range(repeats):
                for s, (x, it) in zip(states, saved):
                    s.x, s.iteration = x, it
                t = time.perf_counter()
                model.prepare(images[: max(1, round(n / max(1, cfg.max_iters / 2)))])
                outs = model.advance(states[:n], halting=halting)
                logits = torch.stack([o.logits for o in outs]) if halting else model.decode_logits([o.token_ids for o in outs])
                model.reconstruct(logits)
                if device.startswith("cuda"):
                    torch.cuda.synchronize(device)
                best = min(best, time.perf_counter() - t)
            curve.step_seconds[n] = best
        for s, (x, it) in zip(states, saved):
            s.x, s.iteration = x, it
    return curve
