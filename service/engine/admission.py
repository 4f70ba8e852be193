"""Admission by measured cost: how many images in flight still buy throughput on this device.

At warm-up a worker times steady-state steps of a real scheduler at several numbers n of images in
flight (admissions, one packed iteration, quality checks and the scheduler's own work included).
Where a step costs about the same for 1 or 32 images, per-image cost falls all the way and every
slot is worth filling; where it grows linearly (a CPU, a compute-bound GPU), past a point more
images in flight only stretch everyone's latency for no throughput. The limit is
the smallest count whose per-image cost is within `TOLERANCE` of the best measured: no per-machine
constant to tune, the curve decides.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..model.speed import Speedups
from .jobs import Job, TokenizeJob
from .observer import EngineObserver
from .policies import Continuous
from .runner import ModelRunner
from .scheduler import Scheduler
from .targets import Limits, Target

TOLERANCE = 0.10  # per-image cost within 10 % of the best measured counts as "as cheap"
ADMISSIONS = ("auto", "max_batch", "measured")


def admission_mode(setting: str, device: str) -> str:
    """`ALIT_ADMISSION` for a worker on `device`: `max_batch` or `measured` as given; `auto` measures
    on a CPU, where a step costs what its images cost, so images in flight past the knee only stretch
    every running image's steps (p99 at 70 % of lock-step's saturation load 0.94x lock-step's with the
    cap, 1.06x without, on scikit-image's samples; docs/benchmarks.md, "Latency, paired"), and takes
    the whole batch elsewhere: a GPU step costs about the same up to the device's saturation, so its
    knee is the batch (not yet measured on a real GPU; loadtest/gpu_checks.sh)."""
    if setting not in ADMISSIONS:
        raise ValueError(f"admission: {setting!r} is none of {', '.join(ADMISSIONS)}")
    if setting != "auto":
        return setting
    return "measured" if device.startswith("cpu") else "max_batch"


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


_MEASURED: dict[tuple, CostCurve] = {}


def cost_curve_for(runner: ModelRunner, limits: Limits, max_batch: int, halting: bool, fingerprint: str,
                   speedups: Speedups) -> CostCurve:
    """`measure_cost_curve`, once per process for the same model (`fingerprint`), device, dtype, batch
    mode, batch, halting, speedups and torch thread count: an engine started again in the same process
    (the benchmark starts one per run) takes the curve its predecessor measured (3.5-4.7 s for the shipped
    model on 2 CPU threads, by the host's speed)."""
    key = (fingerprint, runner.device, runner.dtype, runner.model.batch_mode, max_batch, halting, speedups,
           torch.get_num_threads())
    if key not in _MEASURED:
        _MEASURED[key] = measure_cost_curve(runner, limits, max_batch, halting)
    return _MEASURED[key]


def sizes_up_to(max_batch: int) -> list[int]:
    out, n = [], 1
    while n < max_batch:
        out.append(n)
        n *= 2
    return [*out, max_batch]


def measure_cost_curve(runner: ModelRunner, limits: Limits, max_batch: int, halting: bool,
                       repeats: int = 5) -> CostCurve:
    """Time steady-state steps of a real scheduler on `runner` at 1, 2, 4, ... max_batch images in
    flight: every step admits k = n / (max_probes / 2) new images (an image stays about half the
    iterations) while the k oldest leave, so a step holds what a busy step holds — the encode of its
    admissions, one packed iteration for all n, their quality checks, and the scheduler's own work.
    One scheduler per size, their steps interleaved round by round (1, 2, 4, ... then again), so a slow
    spell of a shared host lands on every size alike rather than on one, which would move the knee;
    the best of `repeats` steps per size. Nothing is kept (schedulers and images of its own)."""
    size = limits.img_size
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2 * max_batch, 3, size, size, generator=g)
    never = Target(max_l1=1e-9)  # quality measured at every iteration, never met
    counter = iter(range(1 << 30))

    def new_jobs(k: int) -> list[Job]:
        return [TokenizeJob(image=images[next(counter) % len(images)], target=never) for _ in range(k)]

    sizes = sizes_up_to(max_batch)
    scheds = {n: Scheduler(runner, Continuous(max_batch=max_batch), EngineObserver(), limits, halting=halting)
              for n in sizes}
    for n, sched in scheds.items():
        sched.step(new_jobs(n))
    best = dict.fromkeys(sizes, float("inf"))
    for r in range(repeats + 1):  # the first round warms every size's shapes
        for n, sched in scheds.items():
            k = max(1, round(n / max(1.0, limits.max_probes / 2)))
            for j in sched.active[:k]:
                j.future.cancel()
            t = time.perf_counter()
            sched.step(new_jobs(k))
            if runner.device.startswith("cuda"):
                torch.cuda.synchronize(runner.device)
            if r:
                best[n] = min(best[n], time.perf_counter() - t)
    for sched in scheds.values():
        for j in sched.active:
            j.future.cancel()
        sched.step([])
    return CostCurve(best)
