"""Quality targets and the per-image halting rule they imply.

A target is one of:
* `max_l1`   — mean absolute pixel error in [0, 1] (the paper's criterion), optionally with `min_psnr`;
* `min_psnr` — PSNR in dB of the clamped reconstruction;
* `tokens`   — an exact budget (ALIT: a multiple of the tokens per iteration): no quality measured;
and `max_tokens` caps a quality target. Which fields a model honours, and which *probes* (ALIT:
iterations; KARL: single passes at a budget and quality conditioning) a target walks, is its
family's `Limits` (model/family.py). An image halts at the first probe meeting its target; when
none does, the best probe is returned with `target_met = False`, as the reference `encode()` does
(lowest L1; highest PSNR for a PSNR-only target).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..model.family import TARGET_FIELDS as FIELDS
from ..model.family import Limits, TargetError
from .records import IterationRecord, Selection

MAX_PSNR = 100.0


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

    def ladder(self, limits: Limits) -> list[int]:
        """The probes this target walks on a model, in order (its family decides)."""
        return limits.ladder(self.max_l1, self.min_psnr, self.tokens, self.max_tokens)

    def next_probe(self, records: Mapping[int, IterationRecord], limits: Limits) -> int | None:
        """The first probe of the ladder not yet recorded (None: every one has run)."""
        return next((p for p in self.ladder(limits) if p not in records), None)

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

    def select(self, records: Mapping[int, IterationRecord], limits: Limits) -> Selection | None:
        """THE halting rule, used by the engine while it runs an image, by the cache on stored
        probes and by the Triton front: given the probes known so far (by key), the answer for
        this target, or None while it is not yet determined.

        A token budget answers with its probe. A quality target walks its ladder and answers with
        the first probe that meets it, or, past the last one, the best probe (earliest on ties)
        with target_met False; an unmeasured probe before that decides nothing (None)."""
        ladder = self.ladder(limits)
        if not self.needs_quality:
            r = records.get(ladder[-1])
            return Selection(r, len(ladder), True) if r is not None else None
        best: IterationRecord | None = None
        for n, key in enumerate(ladder, 1):
            r = records.get(key)
            if r is None or r.l1 is None:
                return None
            if self.met(r.l1, r.psnr):
                return Selection(r, n, True)
            if best is None or self.better(r.l1, r.psnr, best.l1, best.psnr):  # type: ignore[arg-type]
                best = r
        assert best is not None
        return Selection(best, len(ladder), False)

    def walked(self, records: Mapping[int, IterationRecord], limits: Limits, probes: int) -> list[IterationRecord]:
        """The first `probes` records of this target's ladder (what an answer walked), in order."""
        return [records[k] for k in self.ladder(limits)[:probes] if k in records]

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in FIELDS if getattr(self, k) is not None}


def _number(field: str, v: Any, lo: float, hi: float, lo_open: bool = True) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise TargetError(field, f"must be a finite number, got {v!r}")
    if (v <= lo if lo_open else v < lo) or v > hi:
        raise TargetError(field, f"must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}")
    return float(v)


def _budget(field: str, v: Any, limits: Limits) -> int:
    if isinstance(v, bool) or not isinstance(v, int) and not (isinstance(v, float) and v.is_integer()):
        raise TargetError(field, f"must be an integer, got {v!r}")
    return limits.check_budget(field, int(v))


def parse_target(spec: dict[str, Any] | None, limits: Limits, default: Target) -> Target:
    """Validate a client's target for a model. Empty or None -> `default` (with any `max_tokens`
    applied). A field the model's family does not honour is a TargetError naming what it accepts."""
    spec = {k: v for k, v in (spec or {}).items() if v is not None}
    unknown = sorted(set(spec) - set(FIELDS))
    if unknown:
        raise TargetError(unknown[0], f"unknown target field (known: {', '.join(FIELDS)})")
    limits.rejects(spec)
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


def check_token_ids(ids: Any, limits: Limits, positions: Any = None):
    """A client's 1D token sequence (and the positions of its ids, for families whose tokens carry
    them) -> (int64 tensor, int64 tensor or None), or TargetError naming the field."""
    import numpy as np
    import torch

    codebook_size = limits.codebook_size
    try:
        arr = np.asarray(ids)
    except (ValueError, TypeError, OverflowError):
        raise TargetError("token_ids", "must be a flat list of integers") from None
    if arr.ndim == 1 and arr.dtype.kind == "O" and all(isinstance(v, int) and not isinstance(v, bool) for v in arr):
        raise TargetError("token_ids", f"ids must be in [0, {codebook_size - 1}] (got integers beyond 64 bits)")
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise TargetError("token_ids", "must be a flat list of integers")
    pos = None
    if positions is not None:
        try:
            pos = np.asarray(positions)
        except (ValueError, TypeError, OverflowError):
            raise TargetError("positions", "must be a flat list of integers") from None
        if pos.ndim != 1 or (pos.size and pos.dtype.kind not in "iu"):
            raise TargetError("positions", "must be a flat list of integers")
        pos = pos.astype(np.int64)  # an empty list reads as floats
    limits.check_sequence(int(arr.shape[0]), pos)
    if arr.size and (arr.min() < 0 or arr.max() >= codebook_size):
        raise TargetError("token_ids",
                          f"ids must be in [0, {codebook_size - 1}], got values in [{arr.min()}, {arr.max()}]")
    return (torch.as_tensor(arr, dtype=torch.long),
            None if pos is None else torch.as_tensor(pos, dtype=torch.long))
