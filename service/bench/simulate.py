"""A SIMULATED device for the benchmark: the real scheduler, policies, admission and halting
bookkeeping, driven by a stand-in model whose calls cost what a cost curve says, on a virtual clock
(no sleeping: a run takes a fraction of a second and gives the same figures on any machine).

Cost curve (in the spirit of LLM-serving simulators such as Vidur): a call over n images costs
`base * max(1, n / saturation)` — flat up to the device's saturation batch, then linear. Calibrated
to ALIT on an H100 in float32 (KARL paper, appendix A.9): one image's first pass (VQGAN encode +
first iteration) about 7 ms, each further iteration about 4 ms; so `prepare` (VQGAN encode) costs
3 ms and an iteration (encoder + decoder + the quality check) 4 ms at or below saturation.
Each request halts where the real model halts on its image and target (`workload.plan`).

The cost model is a walk of equal-cost iterations, each extending the one before (ALIT's): it
applies to a family whose probes are the successive iterations 1..n of one walk and whose
`max_tokens` caps that walk (`unusable` says why not otherwise; the benchmark then skips it).
"""

from __future__ import annotations

import collections
import contextlib
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..engine import Target
from ..engine.admission import CostCurve, sizes_up_to
from ..engine.jobs import Job, TokenizeJob
from ..engine.observer import EngineObserver
from ..engine.policies import make_policy
from ..engine.scheduler import Scheduler
from ..model.family import Limits, StepOutput, TargetError
from .workload import Request, poisson


@dataclass
class SimCosts:
    saturation: int = 32
    prepare_s: float = 0.003
    iteration_s: float = 0.004

    def call(self, base: float, n: int) -> float:
        return base * max(1.0, n / self.saturation)


@dataclass
class SimState:
    """A stand-in image's state: what the scheduler reads of one (`family.ImageStateLike`)."""

    image: torch.Tensor
    iteration: int = 0


def tokens_per_probe(limits: Limits) -> int:
    return limits.max_tokens // limits.max_probes


def unusable(limits: Limits) -> str | None:
    """Why the simulated device cannot stand in for this model (None: it can). It needs probes that
    are the successive iterations 1..n of one walk, the walk capped by `max_tokens` (the stand-in's
    targets) and quality targets on L1."""
    if not {"max_l1", "max_tokens"} <= set(limits.accepts):
        return f"its targets need max_l1 and max_tokens; this model accepts {', '.join(limits.accepts)}"
    t = tokens_per_probe(limits)
    for n in range(1, limits.max_probes + 1):
        try:
            limits.check_budget("max_tokens", n * t)
            ladder = limits.ladder(0.5, None, None, n * t)
        except TargetError as e:
            return f"a cap of {n * t} tokens is no budget this model takes ({e.message})"
        if ladder != list(range(1, n + 1)):
            return (f"its probes are not successive iterations of one walk (max_l1 0.5 capped at {n * t} tokens "
                    f"walks probes {ladder}, not 1..{n})")
    return None


class VirtualClock:
    def __init__(self) -> None:
        self.now = 0.0


class SimulatedDevice:
    """Stands in for `ModelRunner`: same calls, no model; each call moves the virtual clock."""

    device = "simulated"

    def __init__(self, costs: SimCosts, clock: VirtualClock, limits: Limits):
        self.costs, self.clock, self.limits = costs, clock, limits
        self.halts_at: dict[int, int | None] = {}  # id(job) -> iteration whose check passes (None: never)

    def precision(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def prepare(self, jobs: list[TokenizeJob]) -> list:
        self.clock.now += self.costs.call(self.costs.prepare_s, len(jobs))
        return [SimState(image=torch.zeros(0)) for _ in jobs]

    def advance(self, jobs: list[TokenizeJob], probes: list[int], halting: bool) -> list:
        self.clock.now += self.costs.call(self.costs.iteration_s, len(jobs))
        outs = []
        t = tokens_per_probe(self.limits)
        for j, p in zip(jobs, probes):
            s = j.state
            assert s is not None  # admitted by prepare()
            s.iteration += 1
            outs.append(StepOutput(token_ids=torch.zeros(t * s.iteration, dtype=torch.long), probe=p,
                                   logits=torch.zeros(0)))
        return outs

    def decode_logits(self, jobs: list[Job], token_ids, iterations) -> list:
        return [torch.zeros(0) for _ in jobs]  # part of the iteration's cost

    def pixels(self, jobs: list[Job], logits, iterations) -> list:
        out = []
        for j in jobs:  # quality checks are part of the iteration's cost
            h = self.halts_at.get(id(j))
            state = j.state if isinstance(j, TokenizeJob) else None
            met = h is not None and state is not None and state.iteration >= h
            out.append((0.0, 99.0) if met else (1.0, 0.0))
        return out


def sim_target(req: Request, limits: Limits) -> Target:
    """A target that makes the stand-in halt where the real model does for this request."""
    if req.target.tokens is not None:
        return req.target
    return Target(max_l1=0.5, max_tokens=len(req.target.ladder(limits)) * tokens_per_probe(limits))


class ArrivalLane:
    """One scheduler fed by timed arrivals on a virtual clock, the worker's loop mirrored (take what
    `Scheduler.to_take` asks, a request-level batcher's fill wait, step with the queue's length; an
    idle worker jumps to the next arrival). With the simulated device the device's calls move the
    clock; with a real runner (`wall=True`) each step moves it by the step's measured wall time, so
    several lanes over one real model can be stepped in turn, the one whose clock is earliest first,
    and a host's slow spell lands on all of them alike (loadtest/latency_paired.py)."""

    def __init__(self, sched: Scheduler, arrivals: list[tuple[float, TokenizeJob]], clock: VirtualClock,
                 wall: bool = False):
        self.sched, self.clock, self.wall = sched, clock, wall
        self.pending = collections.deque(sorted(arrivals, key=lambda a: a[0]))
        self.queue: collections.deque[tuple[float, TokenizeJob]] = collections.deque()
        self.running: list[tuple[float, TokenizeJob]] = []  # taken from the queue, not yet answered
        self.latencies: list[float] = []
        self.iterations: list[int] = []
        self.first = self.pending[0][0] if self.pending else 0.0

    @property
    def busy(self) -> bool:
        return bool(self.pending or self.queue or self.sched.holding)

    def _arrive(self, until: float) -> None:
        while self.pending and self.pending[0][0] <= until:
            self.queue.append(self.pending.popleft())

    def turn(self) -> None:
        """One pass of the worker's loop: at most one scheduler step."""
        sched, clock, policy = self.sched, self.clock, self.sched.policy
        self._arrive(clock.now)
        if not self.queue and not sched.holding:
            clock.now = self.pending[0][0]
            return
        cap = sched.to_take(len(self.queue))
        if cap and policy.fill_wait and not sched.holding:  # a batcher waits (virtually) to fill
            fill_by = clock.now + policy.fill_wait
            while len(self.queue) < cap and self.pending and self.pending[0][0] <= fill_by:
                clock.now = max(clock.now, self.pending[0][0])
                self._arrive(clock.now)
            if len(self.queue) < cap:
                clock.now = max(clock.now, fill_by)
                self._arrive(clock.now)
        new = [self.queue.popleft() for _ in range(min(cap, len(self.queue)))]
        if not new and not sched.holding:
            return
        self.running += new
        t = time.perf_counter()
        sched.step([j for _, j in new], len(self.queue))
        if self.wall:
            clock.now += time.perf_counter() - t
        still = []
        for at, j in self.running:
            if not j.future.done():
                still.append((at, j))
            elif j.future.exception() is None:
                self.latencies.append(clock.now - at)
                self.iterations.append(j.future.result().iterations)
        self.running = still

    def run(self) -> dict:
        while self.busy:
            self.turn()
        return self.summary()

    def summary(self) -> dict:
        lat = np.array(self.latencies)
        makespan = self.clock.now - self.first
        return {"requests": len(lat), "makespan_s": makespan, "throughput": len(lat) / makespan,
                "p50_s": float(np.percentile(lat, 50)), "p99_s": float(np.percentile(lat, 99)),
                "mean_iterations": float(np.mean(self.iterations))}


def simulate(policy_name: str, reqs: list[Request], arrivals: list[float], limits: Limits,
             costs: SimCosts, max_batch: int, lockstep_max_delay: float = 0.010, refill_at: float = 1.0) -> dict:
    clock = VirtualClock()
    device = SimulatedDevice(costs, clock, limits)
    policy = make_policy(policy_name, max_batch, lockstep_max_delay, refill_at)
    policy.calibrate(sim_cost_curve(costs, max_batch).knee())
    sched = Scheduler(device, policy, EngineObserver(), limits, halting=True)  # type: ignore[arg-type]
    jobs = []
    for req in reqs:
        job = TokenizeJob(image=torch.zeros(0), target=sim_target(req, limits))
        quality_met = req.target_met and req.target.tokens is None
        device.halts_at[id(job)] = req.halts_at if quality_met else None
        jobs.append(job)
    return ArrivalLane(sched, list(zip(arrivals, jobs)), clock).run()


def sim_cost_curve(costs: SimCosts, max_batch: int) -> CostCurve:
    """What `admission.measure_cost_curve` would measure on the simulated device."""
    return CostCurve({n: costs.call(costs.iteration_s, n) for n in sizes_up_to(max_batch)})


def compare(reqs: list[Request], limits: Limits, saturation: int, n_poisson: int = 2000,
            load: float = 0.7, strategies=("reference", "lockstep", "continuous"), refill_at: float = 1.0) -> dict:
    """Saturation throughput per strategy, then p50/p99 at `load` x lock-step's saturation."""
    costs = SimCosts(saturation=saturation)
    out: dict = {"saturation_batch": saturation, "max_batch": saturation,
                 "costs_ms": {"prepare": costs.prepare_s * 1e3, "iteration": costs.iteration_s * 1e3}}
    for name in strategies:
        n = len(reqs) if name != "reference" else min(len(reqs), 200)
        sat = simulate(name, reqs[:n], [0.0] * n, limits, costs, saturation, refill_at=refill_at)
        out[name] = {"saturation_throughput": sat["throughput"]}
    rate = load * out["lockstep"]["saturation_throughput"]
    arrivals = poisson(rate, n_poisson, seed=3)
    work = [reqs[i % len(reqs)] for i in range(n_poisson)]
    for name in strategies:
        if out[name]["saturation_throughput"] <= rate:
            out[name]["overloaded_at_70pct"] = True
            continue
        r = simulate(name, work, arrivals, limits, costs, saturation, refill_at=refill_at)
        out[name]["p50_at_70pct_lockstep_load"] = r["p50_s"]
        out[name]["p99_at_70pct_lockstep_load"] = r["p99_s"]
    return out
