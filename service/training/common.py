"""Shared training plumbing: seeding, thread limits, LR schedule, atomic resumable checkpoints, logs."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch


def setup_threads(threads: int | None) -> None:
    if threads:
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        torch.set_num_threads(threads)
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(1)


def seed_all(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def lr_at(step: int, total: int, peak: float, warmup: int, final_frac: float = 0.1) -> float:
    """Linear warm-up to `peak`, then cosine down to `final_frac * peak`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def save_state(path: Path, **state) -> None:
    """Atomic torch.save of a dict of tensors / plain values (weights_only-loadable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_state(path: Path) -> dict | None:
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def resume(path: Path, module: torch.nn.Module, opt: torch.optim.Optimizer,
           key: str = "model") -> tuple[int, dict | None]:
    """Restore a stage checkpoint into `module` (its weights under `key`) and `opt`, when there is one:
    (the step to start from, the saved state or None)."""
    state = load_state(path)
    if state is None:
        return 0, None
    module.load_state_dict(state[key])
    opt.load_state_dict(state["opt"])
    return int(state["step"]), state


class Log:
    """Appends one JSON object per line to `path`, and prints a one-line progress bar."""

    def __init__(self, path: Path, total: int, label: str, start: int = 0, quiet: bool = False):
        self.path, self.total, self.label, self.quiet = Path(path), total, label, quiet
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.t0, self.start = time.time(), start

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def step(self, step: int, record: dict, msg: str, every: int = 10) -> None:
        """Log a step's record; print progress every `every` steps and whenever it holds a held-out curve."""
        self.write(record)
        if step % every == 0 or "heldout_l1" in record:
            if "heldout_l1" in record:
                msg += " heldout=" + " ".join(f"{v:.3f}" for v in record["heldout_l1"])
            self.progress(step, msg)

    def progress(self, step: int, msg: str) -> None:
        if self.quiet:
            return
        done = (step - self.start) / max(1, self.total - self.start)
        el = time.time() - self.t0
        eta = el / max(done, 1e-9) * (1 - done) if done > 0 else float("nan")
        bar = "#" * int(20 * step / max(1, self.total))
        print(f"[{self.label}] {step:6d}/{self.total} [{bar:<20s}] {el/60:5.1f}m eta {eta/60:5.1f}m {msg}",
              file=sys.stderr, flush=True)
