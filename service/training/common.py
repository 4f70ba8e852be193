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


def resolve_device(name: str = "auto") -> torch.device:
    """The device to train on, by the engine's rule for device names (`resolve_devices`: `auto` is
    every CUDA device, else the CPU; `cpu`; `cuda[:N]`), one device: the first."""
    from ..engine.workers import resolve_devices

    devices = resolve_devices(name)
    if len(devices) > 1 and name.strip().lower() != "auto":
        raise ValueError(f"training runs on one device, not {name!r}")
    return torch.device(devices[0])


def use_bf16(device: torch.device, amp: str = "auto") -> bool:
    """Whether training runs under bfloat16 autocast: `auto` = on CUDA only (on this project's CPUs
    bfloat16 was slower than float32, docs/training.md), `on`, `off`."""
    if amp not in ("auto", "on", "off"):
        raise ValueError(f"amp must be auto, on or off, not {amp!r}")
    return amp == "on" or (amp == "auto" and device.type == "cuda")


def autocast(device: torch.device, enabled: bool):
    """bfloat16 autocast for the forward pass; float32 (no autocast) when not enabled. Losses,
    softmax and norms stay float32 under autocast; the vector-quantiser distances opt out (`exact`)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def exact(t: torch.Tensor):
    """A block computed in float32 even inside bfloat16 autocast (nearest-code searches: a bfloat16
    distance picks a different code too often); use `with exact(x):` and `.float()` the inputs."""
    return torch.autocast(device_type=t.device.type, enabled=False)


def on(device: torch.device, t: torch.Tensor) -> torch.Tensor:
    """Move a tensor drawn from a CPU generator to `device`. Every random draw in training comes
    from seeded CPU generators, so a seed gives the same draws on every device."""
    return t.to(device, non_blocking=True)


def to_cpu(state):
    """A state (nested dicts / lists of tensors, as state_dict() returns) with every tensor on the
    CPU, so a checkpoint resumes on either device."""
    if isinstance(state, torch.Tensor):
        return state.detach().cpu()
    if isinstance(state, dict):
        return {k: to_cpu(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(to_cpu(v) for v in state)
    return state


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
    """Atomic torch.save of a dict of tensors / plain values (weights_only-loadable), every tensor
    on the CPU: a checkpoint written on a GPU resumes on a CPU and the other way round (the module
    and optimiser copy the loaded values onto their own device)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(to_cpu(state), tmp)
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
        """Append `record` with the wall-clock time it was written (`time`, seconds since the epoch;
        the loops read a loss back each step, so on a GPU the step has finished by then)."""
        with self.path.open("a") as f:
            f.write(json.dumps({**record, "time": round(time.time(), 4)}) + "\n")

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
