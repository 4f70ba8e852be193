"""One recurrent step with halting for 32 images, three ways of sharing it (`ALIT_BATCH_MODE`):
all at the same iteration, or spread over the 8 iterations (4 per iteration, the continuous
batcher's usual mix); ms per image, best of 5 calls, median of 3 rounds.

    python loadtest/batch_modes.py [--model M] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.model.registry import resolve
from service.settings import DEFAULT_MODEL
from step_setup import best_of, repeatable_step, spread  # this folder

MODES = ("packed", "cohort", "padded")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=DEFAULT_MODEL, help="default: the shipped model")
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
                    step = repeatable_step(model, spread(model, images, spread_out=mix == "spread over 8"))
                    results.setdefault((mode, mix), []).append(best_of(step) / len(images) * 1e3)
    threads = torch.get_num_threads()
    print(f"{'mode':<8} {'same iteration':>15} {'spread over 8':>15}   (ms per image, {threads} threads)")
    for mode in MODES:
        same = statistics.median(results[(mode, 'same iteration')])
        mixed = statistics.median(results[(mode, 'spread over 8')])
        print(f"{mode:<8} {same:15.2f} {mixed:15.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
