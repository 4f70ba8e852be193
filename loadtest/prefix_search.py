"""How a One-D-Piece quality target should search for its prefix: the ladder's spacing and the order
of probing, measured on real images.

    python loadtest/prefix_search.py --model tests/fixtures/one-d-piece-reference --out docs/prefix_search.json

Every image's L1 at EVERY prefix length 1..N is measured once with the real model (the same probes
the engine runs: `service.bench.workload.measure`); each strategy is then replayed on that table, so
its answer and its number of probes (one prefix decode + one pixel decode each) are exact, not
sampled. Strategies over a ladder of lengths `step, 2*step, ..., N`:

- ascending (the service's rule): probe in order, stop at the first length that meets the target;
  its answer IS the documented one, "the shortest length on the ladder whose reconstruction meets
  the target" (none meets: the lowest-L1 length, target_met false).
- bisection: binary search for the first length that meets, which is right only when L1 never rises
  with length.
- coarse-fine: ascending over every 4th ladder length, then ascending inside the bracket found;
  right only when no length before the first coarse hit meets the target.

Reported per ladder step and strategy: mean probes per image, mean tokens chosen, and how often the
answer differs from the documented one (tokens or target_met), over targets at several L1 quantiles.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.bench import DEFAULT_IMAGES, workload  # noqa: E402
from service.model.registry import resolve  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
Answer = tuple[int, bool, int]  # (tokens, target met, probes)


def _unmet(l1: np.ndarray, probed: list[int]) -> Answer:
    best = min(probed, key=lambda k: (l1[k - 1], k))
    return best, False, len(set(probed))


def ascending(l1: np.ndarray, ladder: list[int], q: float) -> Answer:
    for i, k in enumerate(ladder):
        if l1[k - 1] <= q:
            return k, True, i + 1
    return _unmet(l1, ladder)


def bisection(l1: np.ndarray, ladder: list[int], q: float) -> Answer:
    lo, hi, probed = 0, len(ladder) - 1, []
    while lo < hi:
        mid = (lo + hi) // 2
        probed.append(ladder[mid])
        if l1[ladder[mid] - 1] <= q:
            hi = mid
        else:
            lo = mid + 1
    if ladder[lo] not in probed:
        probed.append(ladder[lo])
    if l1[ladder[lo] - 1] <= q:
        return ladder[lo], True, len(set(probed))
    return _unmet(l1, probed)


def coarse_fine(l1: np.ndarray, ladder: list[int], q: float, every: int = 4) -> Answer:
    coarse = ladder[every - 1 :: every]
    if not coarse or coarse[-1] != ladder[-1]:
        coarse.append(ladder[-1])
    probed = []
    for k in coarse:
        probed.append(k)
        if l1[k - 1] <= q:
            lo = ladder.index(k)
            start = max(0, lo - every + 1)
            for j in ladder[start:lo]:
                probed.append(j)
                if l1[j - 1] <= q:
                    return j, True, len(set(probed))
            return k, True, len(set(probed))
    return _unmet(l1, probed)


STRATEGIES: dict[str, Callable[[np.ndarray, list[int], float], Answer]] = {
    "ascending": ascending, "bisection": bisection, "coarse-fine": coarse_fine}


def run(spec: str, folders: list[str], n_crops: int, steps: list[int], quantiles: list[float]) -> dict:
    torch.manual_seed(0)
    loaded = resolve(spec)
    model, limits = loaded.model, loaded.model.limits
    n = limits.max_tokens
    photos = [p for f in folders for p in workload.load_folder(f)]
    images = workload.corpus(photos, n_crops)
    pixels = workload.tensors(images, limits.img_size, resample=limits.resample)
    table = workload.measure(model, pixels, [list(range(1, n + 1))], halting=False).l1  # (N, images)
    rises = float(np.mean([(np.diff(table[:, i]) > 0).mean() for i in range(table.shape[1])]))
    targets = [float(np.quantile(table[n // 2 - 1], q)) for q in quantiles]  # L1 at half the tokens
    rows = []
    for step in steps:
        ladder = list(range(step, n + 1, step))
        if ladder[-1] != n:
            ladder.append(n)
        want = {(i, q): ascending(table[:, i], ladder, q) for i in range(table.shape[1]) for q in targets}
        for name, strategy in STRATEGIES.items():
            got = {key: strategy(table[:, key[0]], ladder, key[1]) for key in want}
            rows.append({
                "ladder_step": step, "strategy": name,
                "probes_per_image": float(np.mean([a[2] for a in got.values()])),
                "tokens_per_image": float(np.mean([a[0] for a in got.values()])),
                "met": float(np.mean([a[1] for a in got.values()])),
                "differs_from_documented": float(np.mean([got[k][:2] != want[k][:2] for k in want])),
            })
    return {"model": spec, "family": loaded.family.name, "num_latent_tokens": n, "images": len(images),
            "targets_max_l1": targets, "target_quantiles": quantiles,
            "fraction_of_steps_where_l1_rises": rises, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "tests" / "fixtures" / "one-d-piece-reference"))
    p.add_argument("--images", nargs="+", default=[str(DEFAULT_IMAGES),
                                                   str(ROOT / "tests" / "fixtures" / "one-d-piece-reference" / "images")])
    p.add_argument("--crops", type=int, default=24)
    p.add_argument("--steps", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--quantiles", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    p.add_argument("--out", help="write the JSON report here")
    a = p.parse_args(argv)
    report = run(a.model, a.images, a.crops, a.steps, a.quantiles)
    print(f"{report['images']} images; L1 rises on {report['fraction_of_steps_where_l1_rises']:.1%} of one-token "
          f"steps; targets max_l1 {', '.join(f'{t:.4f}' for t in report['targets_max_l1'])}")
    print("| ladder step | strategy | probes / image | tokens / image | met | differs from the documented answer |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in report["rows"]:
        print(f"| {r['ladder_step']} | {r['strategy']} | {r['probes_per_image']:.2f} | {r['tokens_per_image']:.1f} "
              f"| {r['met']:.0%} | {r['differs_from_documented']:.1%} |")
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
