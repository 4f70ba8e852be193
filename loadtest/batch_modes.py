"""One recurrent step with halting for 32 images, three ways of sharing it (`ALIT_BATCH_MODE`):
all at the same iteration, or spread over the 8 iterations (4 per iteration, the continuous
batcher's usual mix); ms per image, best of 5 calls, median of 3 rounds.

    python loadtest/batch_modes.py [--model weights] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.model.registry import resolve

MODES = ("packed", "cohort", "padded")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="weights")
    p.add_argument("--threads", type=int)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    model = resolve(a.model).model.eval()
    cfg = model.cfg
    images = torch.rand(32, 3, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(0))
    results: dict[tuple[str, str], list[float]] = {}
    with torch.inference_mode():
        for _ in range(3):
            for mode in MODES:
                model.batch_mode = mode  # type: ignore[assignment]
                for mix in ("same iteration", "spread over 8"):
                    states = model.prepare(images)
                    if mix == "spread over 8":  # image i has run i % 8 iterations
                        for k in range(cfg.max_iters - 1):
                            sub = [s for i, s in enumerate(states) if i % cfg.max_iters > k]
                            if sub:
                                model.advance(sub, halting=True)
                    saved = [(s.x, s.iteration) for s in states]
                    best = float("inf")
                    for _ in range(5):
                        for s, (x, it) in zip(states, saved):
                            s.x, s.iteration = x, it
                        t = time.perf_counter()
                        model.advance(states, halting=True)
                        best = min(best, time.perf_counter() - t)
                    results.setdefault((mode, mix), []).append(best / len(states) * 1e3)
    threads = torch.get_num_threads()
    print(f"{'mode':<8} {'same iteration':>15} {'spread over 8':>15}   (ms per image, {threads} threads)")
    for mode in MODES:
        same = statistics.median(results[(mode, 'same iteration')])
        spread = statistics.median(results[(mode, 'spread over 8')])
        print(f"{mode:<8} {same:15.2f} {spread:15.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
