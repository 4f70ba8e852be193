"""Per-stage cost of the model at a full batch, and the efficiency figure built on it.

Efficiency of a strategy = its throughput / the ideal throughput for the same work, where the ideal
does each image's own probes and quality checks at the best per-image cost measured here (every
stage at a full batch of images running the same probe): prepare once per image, each probe it
walked at that probe's cost (ALIT: iteration k at the cost of iteration k), and per quality check
one pixel decode (plus the decoder call for the probe's logits, where the probe does not decode
already). 100 % means no batching loss at all.

The stages are timed along the ladders the workload's targets walk (`workload.walks_of`), through
the family interface only: `prepare`, `advance` probe after probe, `decode_logits`, `reconstruct`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..model.family import Tokenizer
from .workload import model_device, probe_logits


@dataclass
class StageProfile:
    batch: int
    prepare_s: float  # per image
    probe_s: dict[int, float]  # per image, per probe key in walk order (ALIT: iteration 1..max_iters)
    pixel_decode_s: float  # per image
    decode_s: float | None = None  # per image: a probe's logits, when `advance` does not give them (None: it does)
    meaning: dict[int, dict[str, Any]] = field(default_factory=dict)  # what each key is (`Limits.describe`)

    @property
    def iteration_s(self) -> list[float]:
        """Every probe's per-image cost, in order."""
        return list(self.probe_s.values())

    @property
    def successive(self) -> bool:
        """The probes are one walk of successive iterations 1..n (each extends the one before)."""
        return list(self.probe_s) == list(range(1, len(self.probe_s) + 1))

    @property
    def check_s(self) -> float:
        """One quality check, per image: the pixel decode, and the logits when a probe lacks them."""
        return self.pixel_decode_s + (self.decode_s or 0.0)

    def ideal_seconds(self, walks: list[list[int]], decodes: list[int]) -> float:
        """The best-case compute time of images that walked these probes (keys, in order) and ran
        these pixel decodes."""
        return sum(self.prepare_s + sum(self.probe_s[k] for k in walk) + d * self.check_s
                   for walk, d in zip(walks, decodes))

    @property
    def pass_s(self) -> float:
        """One image's prepare, every profiled probe and one quality check, per image."""
        return self.prepare_s + sum(self.probe_s.values()) + self.check_s

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"batch": self.batch, "prepare_ms_per_image": self.prepare_s * 1e3}
        if self.successive:
            d["iteration_ms_per_image"] = [s * 1e3 for s in self.probe_s.values()]
        else:
            d["probe_ms_per_image"] = {str(k): s * 1e3 for k, s in self.probe_s.items()}
            d["probes"] = {str(k): self.meaning.get(k, {}) for k in self.probe_s}
        d["pixel_decode_ms_per_image"] = self.pixel_decode_s * 1e3
        if self.decode_s is not None:
            d["decode_ms_per_image"] = self.decode_s * 1e3
        return d

    def describe(self) -> str:
        """One line of the per-image costs."""
        if self.successive:
            probes = "iterations " + " ".join(f"{s * 1e3:.2f}" for s in self.probe_s.values()) + " ms"
        else:
            shown = list(self.probe_s.items())[:SHOWN]
            probes = "probes " + ", ".join(f"{probe_name(k, self.meaning)} {s * 1e3:.2f} ms" for k, s in shown)
            if len(self.probe_s) > SHOWN:
                probes += (f", ... ({len(self.probe_s)} probes, {min(self.probe_s.values()) * 1e3:.2f} to "
                           f"{max(self.probe_s.values()) * 1e3:.2f} ms)")
        decode = "" if self.decode_s is None else f", token decode {self.decode_s * 1e3:.2f} ms"
        return (f"prepare {self.prepare_s * 1e3:.2f} ms, {probes}{decode}, "
                f"pixel decode {self.pixel_decode_s * 1e3:.2f} ms")


SHOWN = 4  # probes named in one progress line


def probe_name(k: int, meaning: dict[int, dict[str, Any]]) -> str:
    """A probe key and what it means: `8210 (budget 256, quality_bin 0.38)`."""
    m = meaning.get(k)
    return f"{k} ({', '.join(f'{a} {b}' for a, b in m.items())})" if m else str(k)


def probe_names(keys: list[int], meaning: dict[int, dict[str, Any]]) -> str:
    """The first few probes named, and how many there are."""
    names = ", ".join(probe_name(k, meaning) for k in keys[:SHOWN])
    return names + (f", ... ({len(keys)} probes)" if len(keys) > SHOWN else "")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_stages(model: Tokenizer, images: torch.Tensor, walks: list[list[int]], halting: bool,
                   repeats: int = 3) -> StageProfile:
    """Best of `repeats`: every stage over all of `images` (a full batch) at once, along each walk
    (prepare, each probe in order, then the last probe's quality check)."""
    dev = model_device(model)
    images = images.to(dev)
    n = images.shape[0]
    best_prep, best_pix = float("inf"), float("inf")
    best_dec: float | None = None
    best = {k: float("inf") for w in walks for k in w}
    with torch.inference_mode():
        for _ in range(repeats):
            for walk in walks:
                _sync(dev)
                t = time.perf_counter()
                states = model.prepare(images)
                _sync(dev)
                best_prep = min(best_prep, time.perf_counter() - t)
                for key in walk:
                    t = time.perf_counter()
                    outs = model.advance(states, probes=[key] * n, halting=halting)
                    _sync(dev)
                    best[key] = min(best[key], time.perf_counter() - t)
                t = time.perf_counter()
                logits = probe_logits(model, outs)
                if any(o.logits is None for o in outs):  # the decoder call a quality check needs
                    _sync(dev)
                    best_dec = min(float("inf") if best_dec is None else best_dec, time.perf_counter() - t)
                _sync(dev)
                t = time.perf_counter()
                model.reconstruct(logits)
                _sync(dev)
                best_pix = min(best_pix, time.perf_counter() - t)
    return StageProfile(n, best_prep / n, {k: s / n for k, s in best.items()}, best_pix / n,
                        None if best_dec is None else best_dec / n,
                        {k: model.limits.describe(k) for k in best})


def flops_per_image(model: Tokenizer, images: torch.Tensor, walks: list[list[int]], halting: bool) -> dict:
    """FLOPs counted by torch's FlopCounterMode (matrix products and convolutions, the bulk of the
    work): per image, for prepare, each probe (`iteration`: a list, for successive iterations 1..n;
    else `probe`, by key), one pixel decode, and (`decode`) the logits where a probe lacks them."""
    from torch.utils.flop_counter import FlopCounterMode

    n = images.shape[0]
    out: dict = {}
    probes: dict[int, float] = {}
    with torch.inference_mode():
        for walk in walks:
            with FlopCounterMode(display=False) as fc:
                states = model.prepare(images.to(model_device(model)))
            out.setdefault("prepare", fc.get_total_flops() / n)
            for key in walk:
                with FlopCounterMode(display=False) as fc:
                    outs = model.advance(states, probes=[key] * n, halting=halting)
                probes.setdefault(key, fc.get_total_flops() / n)
        with FlopCounterMode(display=False) as fc:
            logits = probe_logits(model, outs)
        if any(o.logits is None for o in outs):
            out["decode"] = fc.get_total_flops() / n
        if list(probes) == list(range(1, len(probes) + 1)):
            out["iteration"] = list(probes.values())
        else:
            out["probe"] = {str(k): f for k, f in probes.items()}
        with FlopCounterMode(display=False) as fc:
            model.reconstruct(logits)
        out["pixel_decode"] = fc.get_total_flops() / n
    return out


def flops_per_pass(flops: dict) -> float:
    """A `flops_per_image` result's prepare, every probe and one quality check."""
    probes = flops["iteration"] if "iteration" in flops else list(flops["probe"].values())
    return flops["prepare"] + sum(probes) + flops["pixel_decode"] + flops.get("decode", 0)


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
