"""Can the halting step's own numbers tell, without decoding pixels, that an iteration cannot meet
an L1 target? (issue 13, item 3: measured, not built into the engine.)

With 2D-token halting on, every iteration already has the latent decoder's logits and, per grid
cell, p_gt = the probability of the image's own VQGAN code. Proxy: e = 1 - mean(p_gt), the expected
fraction of wrong codes. For each L1 target level T, a skip rule "no pixel decode while e > c(T)"
is fitted on one half of the images (c(T) = the largest e among iterations that met T there) and
scored on the other half: how many decodes it saves, and how many requests get a different answer
(first iteration meeting T, else the best) than with every decode.

    python loadtest/decode_skip.py --json docs/decode_skip.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.bench import DEFAULT_IMAGES, workload
from service.engine import Target
    from service.model.alit import ALITLimits
from service.engine.records import IterationRecord
from service.model.measure import iterate_and_measure
from service.model.registry import resolve
from service.settings import DEFAULT_MODEL


def measure(model, pixels: torch.Tensor, batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(L1, proxy e), each (iterations, images), with halting on as the engine runs."""
    l1s, es = [], []
    with torch.inference_mode():
        for i in range(0, len(pixels), batch):
            rows = list(iterate_and_measure(model, pixels[i : i + batch], halting=True))
            l1s.append(np.stack([r.l1.numpy() for r in rows]))
            es.append(np.stack([np.array([1 - float(s.pred_gt_prob.mean()) for s in r.steps]) for r in rows]))
    return np.concatenate(l1s, 1), np.concatenate(es, 1)


def answer(l1: np.ndarray, target: Target, limits: ALITLimits, decoded: np.ndarray) -> int:
    """The iteration the engine returns when only `decoded` iterations are measured (skipped ones
    count as not meeting the target)."""
    recs = {n + 1: IterationRecord(n + 1, np.zeros(0, np.int32), float(l1[n]) if decoded[n] else 9.0, None)
            for n in range(len(l1))}
    sel = target.select(recs, limits)
    assert sel is not None
    return sel.record.iteration


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=DEFAULT_MODEL, help="default: the shipped model")
    p.add_argument("--crops", type=int, default=400)
    p.add_argument("--json")
    a = p.parse_args()
    loaded = resolve(a.model)
    cfg = loaded.config
    limits = ALITLimits(cfg.tokens_per_iter, cfg.max_iters)
    images = workload.corpus(workload.load_folder(DEFAULT_IMAGES), a.crops, seed=7)
    pixels = workload.tensors(images, cfg.img_size)
    l1, e = measure(loaded.model, pixels)
    n = l1.shape[1]
    idx = list(range(n))
    random.Random(0).shuffle(idx)
    fit, test = idx[: n // 2], idx[n // 2 :]
    rho = float(np.corrcoef(e.ravel(), l1.ravel())[0, 1])
    report: dict = {"model": a.model, "images": n, "fit_images": len(fit), "test_images": len(test),
                    "pearson_proxy_vs_l1": rho, "levels": []}
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):  # L1 targets across the range the model reaches
        T = float(np.quantile(l1, q))
        target = Target(max_l1=T)
        met = l1[:, fit] <= T
        c = float(e[:, fit][met].max()) if met.any() else -1.0
        decodes_all = decodes_rule = changed = 0
        for i in test:
            full = answer(l1[:, i], target, limits, np.ones(cfg.max_iters, bool))
            rule = e[:, i] <= c
            got = answer(l1[:, i], target, limits, rule)
            stop_full = full if l1[full - 1, i] <= T else cfg.max_iters
            decodes_all += stop_full
            decodes_rule += int(rule[:stop_full].sum())
            changed += int(got != full)
        report["levels"].append({"max_l1": T, "threshold_e": c, "decodes_saved": 1 - decodes_rule / decodes_all,
                                 "answers_identical": 1 - changed / len(test)})
        print(f"max_l1 {T:.4f}: skip while e > {c:.3f}: {1 - decodes_rule / decodes_all:.1%} of decodes saved, "
              f"{1 - changed / len(test):.2%} identical answers on {len(test)} held-out images", flush=True)
    print(f"correlation of e with L1 over every (image, iteration): {rho:.3f}")
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
