"""Latency under Poisson load of several scheduling policies, measured so that a shared machine's
drift cancels (the latency counterpart of saturation_paired.py). Separate runs cannot compare p99s
here: the bench offers 70 % of a throughput measured minutes earlier, and a host that slows down by a
fifth meanwhile turns that into 85 % for one strategy's round and not the other's (its p99 pairs
spread 0.76-1.71x on the same code, docs/benchmarks.md).

Each policy gets its own scheduler over the SAME model and its own copy of the same arrivals, on a
virtual clock that moves by the wall time of that scheduler's own steps (`simulate.ArrivalLane`, the
worker's loop mirrored; an idle worker jumps to its next arrival). The lanes are stepped in turn on
one thread, always the lane whose clock is earliest, so at any moment of the host's time every lane
is at about the same point of the arrival sequence: a slow spell lands on all of them alike. A
request's latency is its answer's clock time minus its arrival. What it leaves out: the asyncio
hand-off and the queue's locks (the same for every policy, ~1 % of a step).

The offered rate is a fraction (`--load`, 0.7) of lock-step's saturation throughput, measured first in
the same way (saturation_paired.py's rounds over the bench's saturation workload, median of
`--rate-rounds`). The host's speed still moves the load every lane sees (alike): each round reports
the share of its time each lane spent stepping ("busy"). Token ids that differ between lanes (the same
image and target batched with other neighbours: float rounding at a near-tie) are reported.

    python loadtest/latency_paired.py [--images DIR] [--requests 600] [--repeats 3] [--load 0.7]
                                      [--policies continuous continuous~measured lockstep] [--json F]
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

from saturation_gap import Tally, bench_plan, workload_arguments
from saturation_paired import POLICY_HELP, one_round, scheduler_for

from service.bench.simulate import ArrivalLane, VirtualClock
from service.bench.workload import poisson
from service.engine import EngineSettings, TokenizeJob
from service.model.registry import resolve


def one_load_round(names: list[str], loaded, work, arrivals: list[float], a) -> dict[str, dict]:
    halting = EngineSettings().halting
    lanes: dict[str, ArrivalLane] = {}
    tallies: dict[str, Tally] = {}
    jobs: dict[str, list[TokenizeJob]] = {}
    for n in names:
        tallies[n] = Tally()
        sched = scheduler_for(n, loaded, a.max_batch, a.batch_mode, halting, tallies[n])
        jobs[n] = [TokenizeJob(image=px, target=t) for px, t in work]
        lanes[n] = ArrivalLane(sched, list(zip(arrivals, jobs[n])), VirtualClock(), wall=True)
    while busy := [lane for lane in lanes.values() if lane.busy]:
        min(busy, key=lambda lane: lane.clock.now).turn()  # ties: the first named (the order rotates)
    ids = {n: [np.asarray(j.future.result(timeout=0).token_ids) for j in js] for n, js in jobs.items()}
    first = names[0]
    for n in names[1:]:
        differ = [i for i, (x, y) in enumerate(zip(ids[first], ids[n])) if not np.array_equal(x, y)]
        if differ:  # the same image and target, batched with different neighbours
            print(f"  {n} and {first} differ on {len(differ)} of {len(work)} requests: " + ", ".join(
                f"#{i} {len(ids[n][i])} vs {len(ids[first][i])} tokens" for i in differ[:5]), flush=True)
    out = {}
    for n, lane in lanes.items():
        s = lane.summary()
        lat, its = np.array(lane.latencies), np.array(lane.iterations)
        longest = lat[its == its.max()]
        out[n] = {**s, "busy": tallies[n].step_s / s["makespan_s"], "steps": tallies[n].steps,
                  "in_flight_limit": getattr(lane.sched.policy, "limit", None),
                  "images_per_step": tallies[n].stepped / max(1, tallies[n].steps),
                  "p99_longest_s": float(np.percentile(longest, 99)), "longest": int(its.max()),
                  "mean_s": float(lat.mean()), "step_s": tallies[n].step_s,
                  "stages_s": dict(tallies[n].stages)}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    workload_arguments(p, requests=600)
    p.add_argument("--policies", nargs="+", default=["continuous", "continuous~measured", "lockstep"], help=POLICY_HELP)
    p.add_argument("--load", type=float, default=0.7, help="of lock-step's saturation throughput")
    p.add_argument("--saturation-requests", type=int, default=256)
    p.add_argument("--rate-rounds", type=int, default=3, help="saturation rounds whose median sets the rate")
    p.add_argument("--rate", type=float, help="offered requests/s (default: --load x lock-step's saturation)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    loaded = resolve(a.model)
    loaded.model.eval()
    plan = bench_plan(loaded, a.images, a.max_batch)
    base = a.policies[-1]
    sat_names = list(dict.fromkeys([a.policies[0], base]))
    one_round(sat_names, loaded, plan(2 * a.max_batch, 1), a)  # warm-up: every shape once
    sat = [one_round(sat_names, loaded, plan(a.saturation_requests, 1), a) for _ in range(a.rate_rounds)]
    lock_sat = statistics.median(r[base]["throughput"] for r in sat)
    rate = a.rate or a.load * lock_sat
    print(f"saturation ({a.rate_rounds} rounds, median): {base} {lock_sat:.2f} img/s ("
          + ", ".join(f"{r[base]['throughput']:.2f}" for r in sat) + f"); offered {rate:.2f} requests/s", flush=True)
    work = plan(a.requests, 2)
    rounds = []
    for rep in range(a.repeats):
        names = a.policies[rep % len(a.policies):] + a.policies[: rep % len(a.policies)]
        arrivals = poisson(rate, a.requests, seed=3 + rep)
        r = one_load_round(names, loaded, work, arrivals, a)
        rounds.append(r)
        print(f"round {rep + 1}: " + "; ".join(
            f"{n} p50 {r[n]['p50_s']:.3f} s ({r[n]['p50_s'] / r[base]['p50_s']:.2f}x) p99 {r[n]['p99_s']:.3f} s "
            f"({r[n]['p99_s'] / r[base]['p99_s']:.2f}x), p99 of {r[n]['longest']}-probe walkers "
            f"{r[n]['p99_longest_s']:.3f} s, busy {r[n]['busy']:.0%}, {r[n]['images_per_step']:.1f} per step "
            f"(limit {r[n]['in_flight_limit']}), "
            f"{r[n]['step_s']:.1f} s in steps ("
            + " ".join(f"{k} {v:.1f}" for k, v in sorted(r[n]["stages_s"].items())) + ")"
            for n in a.policies), flush=True)
    keys = ("p50_s", "p99_s", "mean_s", "p99_longest_s", "busy")
    summary = {n: {**{k: statistics.median(r[n][k] for r in rounds) for k in keys},
                   **{f"{k}_vs_{base}": statistics.median(r[n][k] / r[base][k] for r in rounds)
                      for k in ("p50_s", "p99_s")},
                   "p99_ratios": [round(r[n]["p99_s"] / r[base]["p99_s"], 3) for r in rounds],
                   "p50_ratios": [round(r[n]["p50_s"] / r[base]["p50_s"], 3) for r in rounds]}
               for n in a.policies}
    print(json.dumps({"threads": torch.get_num_threads(), "rate": rate, "requests": a.requests,
                      "median": summary}, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "saturation": sat, "rate": rate, "rounds": rounds,
                                            "median": summary}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
