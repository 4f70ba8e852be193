"""Where continuous batching loses to lock-step at saturation: the same saturation workload as
`alit-serve bench` (its corpus, targets and request plan) through the real engine with each policy,
rounds interleaved, and per policy the time the model calls took by stage (the engine's own stage
timers), the number of steps, the images per step and the attention runs (same-length groups) per
packed call — the per-step profile of issue 24, item 6.

    python loadtest/saturation_gap.py --repeats 3 [--model service/weights] [--images DIR] [--policies ...]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.bench import DEFAULT_IMAGES, workload  # noqa: E402
from service.bench.live import drive  # noqa: E402
from service.engine import Engine, EngineSettings, Target  # noqa: E402
from service.engine.observer import EngineObserver  # noqa: E402
from service.model import transformer  # noqa: E402
from service.model.registry import resolve  # noqa: E402


class Tally(EngineObserver):
    def __init__(self) -> None:
        self.stages: collections.Counter[str] = collections.Counter()
        self.steps = 0
        self.step_s = 0.0
        self.stepped = 0

    def stage(self, iteration: int, stage: str, seconds: float, device: str) -> None:
        self.stages[stage] += seconds

    def step(self, batch_size: int, seconds: float, device: str) -> None:
        self.steps += 1
        self.step_s += seconds
        self.stepped += batch_size


GROUPS: list[int] = []


def _count_groups() -> None:
    """Count the attention runs of every packed call (one attention call per same-length run)."""
    pack = transformer.pack

    def counting(seqs):
        out = pack(seqs)
        GROUPS.append(len(out[1]))
        return out

    transformer.pack = counting  # type: ignore[assignment]


def bench_plan(loaded, folder: str, max_batch: int) -> Callable[[int, int], list[tuple[torch.Tensor, Target]]]:
    """The workload of `alit-serve bench` on `folder`: its corpus and calibrated targets, and a plan of
    n requests drawn with a seed (the bench draws its saturation run with seed 1, its Poisson runs with
    seed 2), as (pixels, target) pairs."""
    limits = loaded.limits
    images = workload.corpus(workload.load_folder(folder), 24)
    pixels = workload.tensors(images, limits.img_size, limits.resample)
    measured = workload.measure(loaded.model, pixels, [workload.default_walk(limits)], True, batch=max_batch)
    targets = workload.calibrate(measured, limits)
    more = measured.missing(workload.walks_of(targets, limits))
    if more:
        measured = measured.merged(workload.measure(loaded.model, pixels, more, True, batch=max_batch,
                                                    skip=measured.keys))

    def plan(n: int, seed: int) -> list[tuple[torch.Tensor, Target]]:
        return [(pixels[r.image], r.target)
                for r in workload.plan_requests(n, len(images), targets, measured, limits, seed=seed)]

    return plan


def saturation_work(loaded, folder: str, requests: int, max_batch: int) -> list[tuple[torch.Tensor, Target]]:
    """The saturation workload of `alit-serve bench` on `folder` (`bench_plan`, seed 1)."""
    return bench_plan(loaded, folder, max_batch)(requests, 1)


def workload_arguments(p: argparse.ArgumentParser, requests: int) -> None:
    """The options this script and saturation_paired.py share: model, folder, request count, rounds,
    batch, threads, JSON output."""
    p.add_argument("--model", default="service/weights")
    p.add_argument("--images", default=str(DEFAULT_IMAGES))
    p.add_argument("--requests", type=int, default=requests)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--batch-mode", default="packed")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    workload_arguments(p, requests=128)
    p.add_argument("--policies", nargs="+", default=["continuous@1", "continuous@0.5", "lockstep"],
                   help="POLICY or continuous@REFILL_AT (the saturated refill point, ALIT_REFILL_AT; "
                        "without it the engine's default)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    _count_groups()
    loaded = resolve(a.model)
    work = saturation_work(loaded, a.images, a.requests, a.max_batch)
    runs: dict[str, list[dict]] = {name: [] for name in a.policies}
    for rep in range(a.repeats):
        for name in a.policies:
            tally = Tally()
            GROUPS.clear()
            policy, _, refill = name.partition("@")
            eng = Engine(loaded, EngineSettings(devices="cpu", max_batch=a.max_batch, policy=policy, max_queue=100_000,
                                                refill_at=refill or "auto", batch_mode=a.batch_mode, warmup=True),
                         observer=tally).start()
            GROUPS.clear()
            try:
                t = time.perf_counter()
                res = asyncio.run(drive(eng, work, [0.0] * len(work)))
                wall = time.perf_counter() - t
            finally:
                eng.shutdown()
            run = {"throughput": res["throughput"], "wall_s": wall, "steps": tally.steps,
                   "images_per_step": tally.stepped / max(1, tally.steps),
                   "step_s_total": tally.step_s, "outside_steps_s": wall - tally.step_s,
                   "stages_s": dict(tally.stages), "model_calls_s": sum(tally.stages.values()),
                   "scheduler_overhead_s": tally.step_s - sum(tally.stages.values()),
                   "attention_runs_per_packed_call": statistics.mean(GROUPS) if GROUPS else 0.0,
                   "packed_calls": len(GROUPS), "mean_iterations": res["mean_iterations"],
                   "pixel_decodes_per_image": res["pixel_decodes_per_image"]}
            runs[name].append(run)
            print(f"round {rep + 1} {name}: {run['throughput']:.2f} img/s, {run['steps']} steps x "
                  f"{run['images_per_step']:.1f} images, model calls {run['model_calls_s']:.2f} s "
                  f"({', '.join(f'{k} {v:.2f}' for k, v in sorted(tally.stages.items()))}), scheduler "
                  f"{run['scheduler_overhead_s']:.2f} s, outside steps {run['outside_steps_s']:.2f} s, "
                  f"{run['attention_runs_per_packed_call']:.1f} attention runs per packed call", flush=True)
    summary = {}
    for name, rs in runs.items():
        keys = ["throughput", "steps", "images_per_step", "model_calls_s", "scheduler_overhead_s",
                "outside_steps_s", "attention_runs_per_packed_call"]
        summary[name] = {k: statistics.median(r[k] for r in rs) for k in keys}
        stages = {s for r in rs for s in r["stages_s"]}
        summary[name]["stages_s"] = {s: statistics.median(r["stages_s"].get(s, 0.0) for r in rs) for s in stages}
    print(json.dumps(summary, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "runs": runs, "median": summary}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
