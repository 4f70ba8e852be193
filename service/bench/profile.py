"""Per-stage cost of the model at a full batch, and the efficiency figure built on it.

Efficiency of a strategy = its throughput / the ideal throughput for the same work, where the ideal
does each image's own iterations and pixel decodes at the best per-image cost measured here (every
stage at a full batch of images at the same iteration): prepare once per image, iteration k at the
cost of iteration k, one pixel decode per quality check. 100 % means no batching loss at all.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..model.alit import ALIT
from ..model.measure import step_logits


@dataclass
class StageProfile:
    batch: int
    prepare_s: float  # per image
    iteration_s: list[float]  # per image, iteration 1..max_iters (with halting when on)
    pixel_decode_s: float  # per image

    def ideal_seconds(self, iterations: list[int], decodes: list[int]) -> float:
        """The best-case compute time of images that ran these iterations and pixel decodes."""
        return sum(self.prepare_s + sum(self.iteration_s[:n]) + d * self.pixel_decode_s
                   for n, d in zip(iterations, decodes))

    @property
    def pass_s(self) -> float:
        """One image's prepare, every iteration and one pixel decode, per image."""
        return self.prepare_s + sum(self.iteration_s) + self.pixel_decode_s

    def to_dict(self) -> dict:
        return {"batch": self.batch, "prepare_ms_per_image": self.prepare_s * 1e3,
                "iteration_ms_per_image": [s * 1e3 for s in self.iteration_s],
                "pixel_decode_ms_per_image": self.pixel_decode_s * 1e3}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_stages(model: ALIT, images: torch.Tensor, halting: bool, repeats: int = 3) -> StageProfile:
    """Best of `repeats`: every stage over all of `images` (a full batch) at once."""
    dev = model.device
    images = images.to(dev)
    n = images.shape[0]
    best_prep, best_pix = float("inf"), float("inf")
    best_it = [float("inf")] * model.cfg.max_iters
    with torch.inference_mode():
        for _ in range(repeats):
            _sync(dev)
            t = time.perf_counter()
            states = model.prepare(images)
            _sync(dev)
            best_prep = min(best_prep, time.perf_counter() - t)
            for k in range(model.cfg.max_iters):
                t = time.perf_counter()
                outs = model.advance(states, halting=halting)
                _sync(dev)
                best_it[k] = min(best_it[k], time.perf_counter() - t)
            logits = step_logits(model, outs)
            _sync(dev)
            t = time.perf_counter()
            model.reconstruct(logits)
            _sync(dev)
            best_pix = min(best_pix, time.perf_counter() - t)
    return StageProfile(n, best_prep / n, [s / n for s in best_it], best_pix / n)


def flops_per_image(model: ALIT, images: torch.Tensor, halting: bool) -> dict:
    """FLOPs counted by torch's FlopCounterMode (matrix products and convolutions, the bulk of the
    work): per image, for prepare, each iteration, and one pixel decode."""
    from torch.utils.flop_counter import FlopCounterMode

    n = images.shape[0]
    out: dict = {"iteration": []}
    with torch.inference_mode():
        with FlopCounterMode(display=False) as fc:
            states = model.prepare(images.to(model.device))
        out["prepare"] = fc.get_total_flops() / n
        for _ in range(model.cfg.max_iters):
            with FlopCounterMode(display=False) as fc:
                outs = model.advance(states, halting=halting)
            out["iteration"].append(fc.get_total_flops() / n)
        logits = step_logits(model, outs)
        with FlopCounterMode(display=False) as fc:
            model.reconstruct(logits)
        out["pixel_decode"] = fc.get_total_flops() / n
    return out


def matmul_peak(device: str, dtype: torch.dtype, n: int = 8192, repeats: int = 10) -> float:
    """Measured FLOP/s of one large square matrix product on `device` (the utilisation yardstick)."""
    dev = torch.device(device)
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(dev)
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(dev)
    return 2 * n**3 * repeats / (time.perf_counter() - t)
