"""Saturation throughput of several scheduling policies, measured so that a shared machine's drift
cancels: one scheduler per policy over the SAME model, each with its own copy of the bench's
saturation workload (all queued at once), stepped in turn — policy A's step, policy B's step, A, B,
... — on one thread, each step timed. A host that slows down for a few seconds slows every policy's
steps alike, where separate runs (`alit-serve bench`, `saturation_gap.py`) see the drift as a
difference between strategies (pairs 0.84-1.16x on the same code, docs/benchmarks.md).

A policy's throughput is its images / the sum of its own step times: at saturation a worker does
nothing but step (the queue hand-off outside steps is ~1 % of the wall time, `saturation_gap.py`).
The workers' loop is mirrored: take what `Scheduler.to_take` asks, step with the queue's length.
Every policy must return the same token ids for every request (checked: they run the same model
calls per image; only the batching differs).

    python loadtest/saturation_paired.py [--images DIR] [--repeats 3] [--requests 256]
                                         [--policies continuous@1 continuous lockstep/cohort lockstep] [--json F]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from saturation_gap import Tally, saturation_work, workload_arguments

from service.engine import EngineSettings, TokenizeJob
from service.engine.admission import cost_curve_for
from service.engine.observer import EngineObserver
from service.engine.policies import make_policy, refill_point
from service.engine.runner import ModelRunner
from service.engine.scheduler import Scheduler
from service.model.registry import resolve
from service.model.speed import Speedups, prepare_for_device


def scheduler_for(name: str, loaded, max_batch: int, batch_mode: str, halting: bool,
                  observer: EngineObserver) -> Scheduler:
    """A CPU scheduler over `loaded` for a policy named POLICY[@REFILL_AT][/BATCH_MODE][:MAX_BATCH][~CAP]
    (CAP: images in flight below saturation, a number or `measured`, ALIT_ADMISSION=measured's cost curve)."""
    name, _, cap = name.partition("~")
    spec, _, size = name.partition(":")
    spec, _, mode = spec.partition("/")
    policy_name, _, refill = spec.partition("@")
    max_batch = int(size or max_batch)
    model = prepare_for_device(loaded.model, "cpu")  # as an engine's CPU worker runs it (shared, as the first one)
    runner = ModelRunner(model, "cpu", "float32", mode or batch_mode, observer)
    policy = make_policy(policy_name, max_batch, refill_at=refill_point(refill or "auto", "cpu"))
    if cap == "measured":  # as a worker does at warm-up, once per process and setting
        curve = cost_curve_for(runner, loaded.limits, max_batch, halting, loaded.fingerprint, Speedups())
        policy.calibrate(curve.knee())
    elif cap:
        policy.calibrate(int(cap))
    return Scheduler(runner, policy, observer, loaded.limits, halting=halting)


POLICY_HELP = ("POLICY[@REFILL_AT][/BATCH_MODE][:MAX_BATCH][~CAP] (continuous@0.5: ALIT_REFILL_AT=0.5, without @: "
               "auto; lockstep/cohort: ALIT_BATCH_MODE=cohort; continuous:16: ALIT_MAX_BATCH=16; continuous~measured: "
               "ALIT_ADMISSION=measured, continuous~8: at most 8 in flight below saturation); the last is the baseline")


class Lane:
    """One policy's scheduler and its own queue of the workload."""

    def __init__(self, name: str, loaded, work, max_batch: int, batch_mode: str, halting: bool):
        self.tally = Tally()  # the scheduler's steps (count, seconds, images) and the model calls' time by stage
        self.name = name
        self.sched = scheduler_for(name, loaded, max_batch, batch_mode, halting, self.tally)
        self.jobs = [TokenizeJob(image=px, target=t) for px, t in work]
        self.queue = list(self.jobs)

    @property
    def busy(self) -> bool:
        return bool(self.queue) or self.sched.holding > 0

    def step(self) -> None:
        take = self.sched.to_take(len(self.queue))
        new, self.queue = self.queue[:take], self.queue[take:]
        self.sched.step(new, len(self.queue))

    def token_ids(self) -> list[np.ndarray]:
        return [np.asarray(j.future.result(timeout=0).token_ids) for j in self.jobs]


def one_round(names: list[str], loaded, work, a) -> dict[str, dict]:
    halting = EngineSettings().halting
    lanes = [Lane(n, loaded, work, a.max_batch, a.batch_mode, halting) for n in names]
    while any(lane.busy for lane in lanes):
        for lane in lanes:
            if lane.busy:
                lane.step()
    first = lanes[0].token_ids()
    for lane in lanes[1:]:
        same = sum(np.array_equal(x, y) for x, y in zip(first, lane.token_ids()))
        if same != len(first):
            raise SystemExit(f"{lane.name} and {lanes[0].name} disagree on {len(first) - same} "
                             f"of {len(first)} requests")
    return {lane.name: {"throughput": len(work) / lane.tally.step_s, "step_s": lane.tally.step_s,
                        "steps": lane.tally.steps, "images_per_step": lane.tally.stepped / max(1, lane.tally.steps),
                        "stages_s": dict(lane.tally.stages)} for lane in lanes}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    workload_arguments(p, requests=256)
    p.add_argument("--policies", nargs="+", default=["continuous@1", "continuous", "lockstep"],
                   help=POLICY_HELP)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    loaded = resolve(a.model)
    loaded.model.eval()
    work = saturation_work(loaded, a.images, a.requests, a.max_batch)
    one_round(a.policies, loaded, work[: 2 * a.max_batch], a)  # warm-up: every shape once
    base = a.policies[-1]
    rounds = []
    for rep in range(a.repeats):
        names = a.policies[rep % len(a.policies):] + a.policies[: rep % len(a.policies)]  # who steps first rotates
        r = one_round(names, loaded, work, a)
        rounds.append(r)
        print(f"round {rep + 1}: " + ", ".join(
            f"{n} {r[n]['throughput']:.2f} img/s ({r[n]['throughput'] / r[base]['throughput']:.3f}x, "
            f"{r[n]['steps']} steps x {r[n]['images_per_step']:.1f}; "
            + " ".join(f"{k} {v:.2f}" for k, v in sorted(r[n]["stages_s"].items())) + " s)" for n in a.policies),
            flush=True)
    summary = {n: {"throughput": statistics.median(r[n]["throughput"] for r in rounds),
                   "vs_" + base: statistics.median(r[n]["throughput"] / r[base]["throughput"] for r in rounds),
                   "ratios": [round(r[n]["throughput"] / r[base]["throughput"], 3) for r in rounds]}
               for n in a.policies}
    print(json.dumps({"threads": torch.get_num_threads(), "requests": len(work), "median": summary}, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "rounds": rounds, "median": summary}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
