"""Quality targets and the per-image halting rule they imply.

A target is one of:
* `max_l1`   — mean absolute pixel error in [0, 1] (the paper's criterion), optionally with `min_psnr`;
* `min_psnr` — PSNR in dB of the clamped reconstruction;
* `tokens`   — an exact budget (a multiple of the tokens per iteration): no quality measured at all;
and `max_tokens` caps a quality target. An image halts at the first iteration meeting its target;
when none does (within the cap) the best iteration is returned with `target_met = False`, as the
reference `encode()` does (lowest L1; highest PSNR for a PSNR-only target).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .records import IterationRecord, Selection

FIELDS = ("max_l1", "min_psnr", "tokens", "max_tokens")
MAX_PSNR = 100.0


class TargetError(ValueError):
    """An invalid target. `field` names the offending field for API error messages."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class ModelLimits:
    tokens_per_iter: int
    max_iters: int

    @property
    def max_tokens(self) -> int:
        return self.tokens_per_iter * self.max_iters


@dataclass(frozen=True)
class Target:
    max_l1: float | None = None
    min_psnr: float | None = None
    tokens: int | None = None
    max_tokens: int | None = None

    @property
    def kind(self) -> str:
        if self.tokens is not None:
            return "tokens"
        return "max_l1" if self.max_l1 is not None else "min_psnr"

    @property
    def needs_quality(self) -> bool:
        return self.tokens is None

    def iteration_cap(self, limits: ModelLimits) -> int:
        """The last iteration (1-based count) this target may run."""
        budget = self.tokens if self.tokens is not None else self.max_tokens
        return limits.max_iters if budget is None else budget // limits.tokens_per_iter

    def met(self, l1: float | None, psnr: float | None) -> bool:
        if not self.needs_quality:
            return True
        ok = True
        if self.max_l1 is not None:
            ok &= l1 is not None and l1 <= self.max_l1
        if self.min_psnr is not None:
            ok &= psnr is not None and psnr >= self.min_psnr
        return ok

    def better(self, l1: float, psnr: float, best_l1: float, best_psnr: float) -> bool:
        """Is (l1, psnr) a better fallback than the best so far? Strict: earliest wins ties."""
        if self.max_l1 is None and self.min_psnr is not None:
            return psnr > best_psnr
        return l1 < best_l1

    def select(self, records: Mapping[int, IterationRecord], limits: ModelLimits) -> Selection | None:
        """THE halting rule, used by the engine while it runs an image, by the cache on stored
        iterations and by the Triton front: given the iterations known so far (by 1-based number),
        the answer for this target, or None while it is not yet determined.

        A token budget answers with its iteration. A quality target answers with the first
        iteration that meets it, or, once the cap is reached without one, the best iteration
        (earliest on ties) with target_met False; an unmeasured iteration before that decides
        nothing (None)."""
        cap = self.iteration_cap(limits)
        if not self.needs_quality:
            r = records.get(cap)
            return Selection(r, cap, True) if r is not None else None
        best: IterationRecord | None = None
        for n in range(1, cap + 1):
            r = records.get(n)
            if r is None or r.l1 is None:
                return None
            if self.met(r.l1, r.psnr):
                return Selection(r, n, True)
            if best is None or self.better(r.l1, r.psnr, best.l1, best.psnr):  # type: ignore[arg-type]
                best = r
        assert best is not None
        return Selection(best, cap, False)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in FIELDS if getattr(self, k) is not None}


def _number(field: str, v: Any, lo: float, hi: float, lo_open: bool = True) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise TargetError(field, f"must be a finite number, got {v!r}")
    if (v <= lo if lo_open else v < lo) or v > hi:
        raise TargetError(field, f"must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}")
    return float(v)


def _budget(field: str, v: Any, limits: ModelLimits) -> int:
    if isinstance(v, bool) or not isinstance(v, int) and not (isinstance(v, float) and v.is_integer()):
        raise TargetError(field, f"must be an integer, got {v!r}")
    v = int(v)
    t = limits.tokens_per_iter
    if v < t or v > limits.max_tokens or v % t:
        raise TargetError(field, f"must be a multiple of {t} between {t} and {limits.max_tokens}, got {v}")
    return v


def parse_target(spec: dict[str, Any] | None, limits: ModelLimits, default: Target) -> Target:
    """Validate a client's target. Empty or None -> `default` (with any `max_tokens` applied)."""
    spec = {k: v for k, v in (spec or {}).items() if v is not None}
    unknown = sorted(set(spec) - set(FIELDS))
    if unknown:
        raise TargetError(unknown[0], f"unknown target field (known: {', '.join(FIELDS)})")
    max_l1 = _number("max_l1", spec["max_l1"], 0.0, 1.0) if "max_l1" in spec else None
    min_psnr = _number("min_psnr", spec["min_psnr"], 0.0, MAX_PSNR) if "min_psnr" in spec else None
    tokens = _budget("tokens", spec["tokens"], limits) if "tokens" in spec else None
    max_tokens = _budget("max_tokens", spec["max_tokens"], limits) if "max_tokens" in spec else None
    if tokens is not None:
        others = [k for k in ("max_l1", "min_psnr", "max_tokens") if k in spec]
        if others:
            raise TargetError("tokens", f"an exact token budget cannot be combined with {', '.join(others)}")
        return Target(tokens=tokens)
    if max_l1 is None and min_psnr is None:
        if max_tokens is None:
            return default
        if default.tokens is not None:
            raise TargetError("max_tokens", "needs max_l1 or min_psnr (the default target is an exact token budget)")
        return Target(default.max_l1, default.min_psnr, None, max_tokens)
    return Target(max_l1=max_l1, min_psnr=min_psnr, max_tokens=max_tokens)


def check_token_ids(ids: Any, codebook_size: int, limits: ModelLimits):
    """A client's 1D token sequence -> int64 tensor, or TargetError(field="token_ids")."""
    import numpy as np
    import torch

    try:
        arr = np.asarray(ids)
    except (ValueError, TypeError, OverflowError):
        raise TargetError("token_ids", "must be a flat list of integers") from None
    if arr.ndim == 1 and arr.dtype.kind == "O" and all(isinstance(v, int) and not isinstance(v, bool) for v in arr):
        raise TargetError("token_ids", f"ids must be in [0, {codebook_size - 1}] (got integers beyond 64 bits)")
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise TargetError("token_ids", "must be a flat list of integers")
    n, t = arr.shape[0], limits.tokens_per_iter
    if n == 0 or n % t or n > limits.max_tokens:
        raise TargetError("token_ids", f"length must be a multiple of {t} between {t} and {limits.max_tokens}, got {n}")
    if arr.min() < 0 or arr.max() >= codebook_size:
        raise TargetError("token_ids",
                          f"ids must be in [0, {codebook_size - 1}], got values in [{arr.min()}, {arr.max()}]")
    return torch.as_tensor(arr, dtype=torch.long)
