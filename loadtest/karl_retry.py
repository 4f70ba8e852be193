"""What `ALIT_RETRY_STRICTER` costs and buys on a KARL model: the same images and targets through the
real engine, one pass per image (off, the reference's behaviour) against passes at ever stricter
quality conditioning until the measured L1 meets the target (on).

    python loadtest/karl_retry.py --model tests/fixtures/karl-reference --targets 0.45 0.6 0.9 --repeats 3

Reports, per target and setting: passes per image, wall milliseconds per image (all images queued at
once), the fraction of images whose measured L1 met the target, and the mean L1 returned. The only
KARL weights on this machine are the fixture's random ones: the cost column is meaningful, the
quality columns say only what a model whose conditioning does not work gets from retrying.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.engine import Engine, EngineSettings, Target  # noqa: E402
from service.imaging import load_for_model  # noqa: E402
from service.model.registry import resolve  # noqa: E402

IMAGES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "karl-reference" / "images"


async def _run(engine: Engine, pixels: list[torch.Tensor], target: Target) -> tuple[float, list]:
    t = time.perf_counter()
    results = await asyncio.gather(*(engine.tokenize(p, target) for p in pixels))
    return time.perf_counter() - t, results


def measure(spec: str, targets: list[float], repeats: int, threads: int) -> list[dict]:
    torch.set_num_threads(threads)
    rows = []
    for retry in (False, True):
        loaded = resolve(spec)
        loaded.model.retry_stricter = retry
        size = loaded.limits.img_size
        pixels = [load_for_model(p.read_bytes(), size) for p in sorted(IMAGES.rglob("*.*"))]
        engine = Engine(loaded, EngineSettings(devices="cpu")).start()
        try:
            for q in targets:
                walls, results = [], []
                for _ in range(repeats):
                    wall, results = asyncio.run(_run(engine, pixels, Target(max_l1=q)))
                    walls.append(wall)
                rows.append({
                    "retry_stricter": retry, "max_l1": q, "images": len(pixels),
                    "passes_per_image": statistics.mean(r.iterations for r in results),
                    "ms_per_image": 1e3 * statistics.median(walls) / len(pixels),
                    "target_met": statistics.mean(float(r.target_met) for r in results),
                    "mean_l1": statistics.mean(r.l1 for r in results),
                    "mean_tokens": statistics.mean(r.num_tokens for r in results),
                })
        finally:
            engine.shutdown()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(IMAGES.parent))
    ap.add_argument("--targets", type=float, nargs="+", default=[0.45, 0.6, 0.9])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    a = ap.parse_args()
    rows = measure(a.model, a.targets, a.repeats, a.threads)
    print(f"{'retry':>6} {'max_l1':>7} {'passes/img':>10} {'ms/img':>8} {'met':>6} {'mean l1':>8} {'tokens':>7}")
    for r in rows:
        print(f"{str(r['retry_stricter']):>6} {r['max_l1']:>7} {r['passes_per_image']:>10.2f} {r['ms_per_image']:>8.1f} "
              f"{r['target_met']:>6.0%} {r['mean_l1']:>8.3f} {r['mean_tokens']:>7.1f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"model": a.model, "threads": a.threads, "repeats": a.repeats,
                                            "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
