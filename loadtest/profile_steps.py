"""Where a scheduler step's time goes (CPU-side Python vs model calls): cProfile over steps of the
real scheduler on one device, all images queued at once. For finding overheads, not a benchmark.

    python loadtest/profile_steps.py --device cuda --dtype bfloat16 --model preset:alit_small
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.engine import Target
from service.engine.jobs import TokenizeJob
from service.engine.observer import EngineObserver
from service.engine.policies import make_policy
from service.engine.runner import ModelRunner
from service.engine.scheduler import Scheduler
from service.model.alit import ALITLimits
from service.model.registry import resolve


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="preset:test_tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--policy", default="continuous")
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--top", type=int, default=30)
    a = p.parse_args()
    loaded = resolve(a.model)
    cfg = loaded.config
    model = loaded.model.to(a.device).eval()
    runner = ModelRunner(model, a.device, a.dtype, "packed", EngineObserver())
    sched = Scheduler(runner, make_policy(a.policy, a.max_batch), EngineObserver(),
                      ALITLimits(cfg.tokens_per_iter, cfg.max_iters))
    g = torch.Generator().manual_seed(0)
    targets = [Target(max_l1=0.05), Target(max_l1=0.1), Target(tokens=64), Target(tokens=256), Target(min_psnr=20)]

    def jobs(n):
        return [TokenizeJob(image=torch.rand(3, cfg.img_size, cfg.img_size, generator=g), target=targets[i % 5])
                for i in range(n)]

    def drain(queue):
        steps = 0
        while queue or sched.holding:
            take = sched.to_take()
            new, queue[:] = queue[:take], queue[take:]
            sched.step(new)
            steps += 1
        return steps

    drain(jobs(16))  # warm up
    queue = jobs(a.images)
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    steps = drain(queue)
    prof.disable()
    wall = time.perf_counter() - t
    print(f"{a.images} images, {steps} steps, {wall:.2f} s, {a.images / wall:.1f} img/s, "
          f"{wall / steps * 1e3:.1f} ms/step")
    pstats.Stats(prof).sort_stats("tottime").print_stats(a.top)


if __name__ == "__main__":
    main()
