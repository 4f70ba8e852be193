"""A training run sized by wall-clock: batch sizes and step counts from measured step times.

`alit-serve train --budget-minutes M` (and `gpu-job`) replace the recipe's fixed step counts by a
plan made at the start of the run and saved as RUN/plan.json:

1. for every stage a few real training steps are timed (in a scratch directory, thrown away; the
   time between two steps' log records, so set-up and checkpoint writes do not count) at
   the recipe's batch size and, on a GPU, at doublings of it, until images per second stop growing
   by `MIN_GAIN` or memory runs out; the stage takes the batch with the most images per second and
   a learning rate scaled by sqrt(batch / recipe batch) (at most x2);
2. the time left after the data and the probes (both measured) and a reserve for export and
   evaluation is shared between the stages (`SHARES`);
3. a stage's step count is its share of the time over the measured seconds per step.

A resumed run reads plan.json and never re-plans, so its schedules are the ones it started with,
on whichever device it resumes.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from time import monotonic

import torch

from ..model.precision import is_oom

# shares of the training time (after data and the reserve) per stage; stage2 is split again into
# phase A (cheap, 1-2 iterations) and phase B (unrolled) by A_SHARE
SHARES = {"stage1": 0.34, "stage2": 0.36, "stage2b": 0.22, "stage3": 0.08}
A_SHARE = 0.3
RESERVE = 0.08  # of the budget: export and evaluation
MIN_GAIN = 0.10  # a doubled batch is taken only if images/s grow by at least this much
MAX_BATCH = 512
PROBE_SHARE = 0.04  # of the budget: a stage's probing stops doubling past this
MIN_STEPS = 5  # a stage never shrinks to nothing (only a toy budget reaches this floor)


@dataclass
class StagePlan:
    batch: int
    steps: int
    lr: float
    seconds_per_step: float
    probed: dict[int, float] = field(default_factory=dict)  # batch -> seconds per step (measured)


@dataclass
class Plan:
    device: str
    budget_seconds: float
    train_seconds: float
    stages: dict[str, StagePlan]
    a_steps: int = 0  # stage 2's phase-A steps
    a_batch: int = 0

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> Plan | None:
        if not path.is_file():
            return None
        d = json.loads(path.read_text())
        stages = {k: StagePlan(**{**v, "probed": {int(b): s for b, s in v["probed"].items()}})
                  for k, v in d.pop("stages").items()}
        return cls(stages=stages, **d)


def batch_candidates(base: int, device: torch.device, limit: int = MAX_BATCH) -> list[int]:
    """The recipe's batch on a CPU (bigger batches buy little there and each probe costs seconds);
    on a GPU the doublings of it up to `limit`."""
    if device.type != "cuda":
        return [base]
    out, b = [], base
    while b <= limit:
        out.append(b)
        b *= 2
    return out or [base]


def choose_batch(timings: dict[int, float]) -> int:
    """Ascending batches with their measured seconds per step -> the batch to train with: walk up
    while images per second grow by at least MIN_GAIN."""
    sizes = sorted(timings)
    best = sizes[0]
    for b in sizes[1:]:
        if b / timings[b] >= (1 + MIN_GAIN) * best / timings[best]:
            best = b
        else:
            break
    return best


def scaled_lr(lr: float, batch: int, base: int) -> float:
    return lr * min(2.0, math.sqrt(batch / base))


def steps_for(seconds: float, seconds_per_step: float) -> int:
    return max(MIN_STEPS, int(seconds / max(seconds_per_step, 1e-6)))


def time_steps(run: Callable[[Path, int, int], object], batch: int, measured: int = 4) -> float:
    """Seconds per training step at `batch`: `run(dir, steps, batch)` trains `steps` steps in a
    scratch directory, logging every step; the time between the log records of step 2 and step
    2 + `measured` over `measured` (model set-up, the first steps' warm-up and the checkpoint write
    are outside that window)."""
    scratch = Path(tempfile.mkdtemp(prefix="alit-probe-"))
    try:
        run(scratch, 2 + measured, batch)
        times = {}
        for log in scratch.glob("*.log.jsonl"):
            for line in log.read_text().splitlines():
                rec = json.loads(line)
                times[rec["step"]] = rec["time"]
        return (times[2 + measured] - times[2]) / measured
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def probe(run: Callable[[Path, int, int], object], base: int, device: torch.device,
          limit: int = MAX_BATCH, max_seconds: float = math.inf) -> dict[int, float]:
    """Measured seconds per step for each batch candidate, stopping at the first out-of-memory, at
    the first doubling that does not pay (MIN_GAIN), or once the doublings have taken `max_seconds`
    (counted after the first candidate, whose run carries the device's warm-up: on the H200 that
    alone used stage 1's whole cap)."""
    out: dict[int, float] = {}
    started = None  # the doublings' clock: starts once the first candidate is timed
    for b in batch_candidates(base, device, limit):
        try:
            out[b] = time_steps(run, b)
        except RuntimeError as e:
            if not is_oom(e) or not out:
                raise
            break
        if len(out) > 1 and choose_batch(out) != b:
            break
        now = monotonic()
        started = now if started is None else started
        if now - started > max_seconds:
            break
    return out


def plan_stage(timings: dict[int, float], *, seconds: float, base_batch: int, lr: float) -> StagePlan:
    """A stage's plan from its probed timings (`probe`) and its seconds of training."""
    batch = choose_batch(timings)
    sps = timings[batch]
    return StagePlan(batch=batch, steps=steps_for(seconds, sps), lr=scaled_lr(lr, batch, base_batch),
                     seconds_per_step=sps, probed=timings)


def shares(budget_seconds: float, spent_seconds: float) -> dict[str, float]:
    """Seconds of training per stage: what is left of the budget after what was spent (data, probes)
    and the reserve, split by SHARES."""
    left = max(0.0, budget_seconds * (1 - RESERVE) - spent_seconds)
    return {k: v * left for k, v in SHARES.items()}
