"""`torch.compile` (service/model/compile.py, `ALIT_COMPILE`) against eager, stage by stage, on the
same 32 images: prepare (VQGAN encode), one packed step with halting with the images spread over
the 8 iterations (the continuous batcher's usual mix), and the pixel decode of a quality check.
ms per image, best of 5 calls, median of 3 rounds, eager and compiled alternating in each round;
then how far the compiled outputs are from eager (token ids, logits, pixels).

    python loadtest/compile_steps.py [--model M] [--threads 2] [--batch 32]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.model.compile import compile_model
from service.model.registry import resolve
from service.settings import DEFAULT_MODEL
from step_setup import best_of, repeatable_step, spread  # this folder

STAGES = ("prepare", "step, spread over 8", "pixel decode")


def stage_times(model, images) -> dict[str, float]:
    step = repeatable_step(model, spread(model, images))
    logits = torch.stack([o.logits for o in step()])
    n = images.shape[0]
    return {"prepare": best_of(lambda: model.prepare(images)) / n * 1e3,
            "step, spread over 8": best_of(step) / n * 1e3,
            "pixel decode": best_of(lambda: model.reconstruct(logits)) / n * 1e3}


def outputs(model, images):
    states = spread(model, images)
    outs = model.advance(states, halting=True)
    logits = torch.stack([o.logits for o in outs])
    return [o.token_ids for o in outs], logits, model.reconstruct(logits)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=DEFAULT_MODEL, help="default: the shipped model")
    p.add_argument("--threads", type=int)
    p.add_argument("--batch", type=int, default=32)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    eager = resolve(a.model).model.eval()
    compiled = copy.deepcopy(eager)
    cfg = eager.cfg
    images = torch.rand(a.batch, 3, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(0))
    times: dict[tuple[str, str], list[float]] = {}
    with torch.inference_mode():
        t = time.perf_counter()
        compile_model(compiled)
        outputs(compiled, images)  # compiles
        outputs(compiled, images[:3])  # another batch size and token count: no recompilation expected
        first = time.perf_counter() - t
        for _ in range(3):
            for name, m in (("eager", eager), ("compiled", compiled)):
                for stage, ms in stage_times(m, images).items():
                    times.setdefault((name, stage), []).append(ms)
        ids_e, lg_e, px_e = outputs(eager, images)
        ids_c, lg_c, px_c = outputs(compiled, images)
    flips = sum(int((a != b).sum()) for a, b in zip(ids_e, ids_c))
    total = sum(x.numel() for x in ids_e)
    print(f"{torch.get_num_threads()} threads, batch {a.batch}; first compiled calls (compiling): {first:.1f} s")
    print(f"{'stage':<22} {'eager':>8} {'compiled':>9}  (ms per image, median of 3 rounds of best-of-5)")
    for stage in STAGES:
        e, c = (statistics.median(times[(n, stage)]) for n in ("eager", "compiled"))
        print(f"{stage:<22} {e:8.2f} {c:9.2f}  {e / c:.2f}x")
    print(f"compiled vs eager: token ids differing {flips} of {total}; logits max |diff| "
          f"{(lg_e - lg_c).abs().max().item():.2e}; pixels max |diff| {(px_e - px_c).abs().max().item():.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
