"""Strategies measured for real: the in-process engine with each policy, on one model and workload.
A saturation run (everything queued at t=0) per strategy, then Poisson arrivals at fractions of
lock-step's saturation throughput."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import torch

from ..engine import Engine, EngineSettings, Target, TokenizeResult


async def drive(engine: Engine, work: list[tuple[torch.Tensor, Target]], arrivals: list[float],
                per_request: bool = False, answers: list[tuple[Target, TokenizeResult]] | None = None) -> dict:
    """Every (image, target) of `work` submitted at its arrival time (s after the start); the
    throughput, latency percentiles, probes and pixel decodes. `per_request` adds each request's
    probes run (`iterations`), pixel decodes, and the probe keys it walked (`walks`); `answers`, when
    given, receives every (target, result) in the order they came back."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    latencies: list[float] = []
    results: list[TokenizeResult] = []
    targets: list[Target] = []

    async def one(img, target, at):
        await asyncio.sleep(max(0.0, t0 + at - loop.time()))
        start = loop.time()
        r = await engine.tokenize(img, target)
        latencies.append(loop.time() - start)
        results.append(r)
        targets.append(target)

    decodes0 = engine.pixel_decodes
    await asyncio.gather(*(one(i, t, a) for (i, t), a in zip(work, arrivals)))
    makespan = loop.time() - t0
    lat = np.array(latencies)
    out: dict[str, Any] = {
        "requests": len(work),
        "makespan_s": makespan,
        "throughput": len(work) / makespan,
        "p50_s": float(np.percentile(lat, 50)),
        "p95_s": float(np.percentile(lat, 95)),
        "p99_s": float(np.percentile(lat, 99)),
        "mean_iterations": float(np.mean([r.iterations for r in results])),
        "pixel_decodes_per_image": (engine.pixel_decodes - decodes0) / len(work),
        "target_met_rate": float(np.mean([r.target_met for r in results])),
    }
    if per_request:
        out.update(iterations=[r.iterations for r in results], pixel_decodes=[r.pixel_decodes for r in results],
                   walks=[t.ladder(engine.limits)[:r.iterations] for t, r in zip(targets, results)])
    if answers is not None:
        answers.extend(zip(targets, results))
    return out


def run_strategy(loaded, strategy: str, settings: EngineSettings, work, arrivals) -> dict:
    s = EngineSettings(**{**settings.__dict__, "policy": strategy})
    eng = Engine(loaded, s).start()
    try:
        res = asyncio.run(drive(eng, work, arrivals, per_request=True))
        curve = eng.workers[0].cost_curve
        if curve is not None:
            res["in_flight_limit"] = curve.knee()
        return res
    finally:
        eng.shutdown()
