"""In-process engine benchmark (no HTTP): three scheduling strategies on one model and workload.

  reference   each request alone, every iteration decoded to pixels, then the first iteration
              meeting the target (what the reference `encode()` does, one image per call);
  lockstep    request-level dynamic batching as a Triton-style batcher does it: a batch forms
              (max size, max delay), runs in lock-step with per-image early exit, and nothing new
              is admitted until the whole batch is done;
  continuous  this engine: new images join at every iteration boundary, each leaves when done.

Workload: the held-out photos, crops of them at several scales, flat and noise images; targets
mixed (max_l1 at three levels, min_psnr, exact token budgets). The quality levels are calibrated on
the model being measured (quantiles of its own per-iteration L1 / PSNR over the corpus), so halting
iterations spread whatever the model. Runs: a saturation run (everything queued at t=0) per
strategy, then Poisson arrivals at fractions of lockstep's saturation throughput.

    python loadtest/bench_engine.py --quick --json docs/bench_engine.json --plot docs/bench_engine.png
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "loadtest"))

import corpus  # noqa: E402
from service.settings import Settings  # noqa: E402
from service.engine import Engine, EngineSettings, Target  # noqa: E402
from service.imaging import preprocess  # noqa: E402
from service.model.measure import iterate_and_measure  # noqa: E402
from service.model.registry import resolve  # noqa: E402

STRATEGIES = ("reference", "lockstep", "continuous")


def build_corpus(size: int, n_crops: int, seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    return [(name, preprocess(img, size)) for name, img in corpus.corpus(n_crops, seed)]


def calibrate_targets(model, corpus) -> list[Target]:
    """Quality levels from the model's own per-iteration L1 / PSNR quantiles over the corpus."""
    images = torch.stack([t for _, t in corpus])
    with torch.inference_mode():
        rows = list(iterate_and_measure(model, images))
    l1s = np.array([r.l1.numpy() for r in rows])  # (iters, images)
    psnrs = np.array([r.psnr.numpy() for r in rows])
    k = model.cfg.max_iters
    levels = [float(np.quantile(l1s[min(i, k - 1)], 0.5)) for i in (1, 3, 5)]
    psnr_level = float(np.quantile(psnrs[min(3, k - 1)], 0.5))
    t = model.cfg.tokens_per_iter
    return [Target(max_l1=levels[0]), Target(max_l1=levels[1]), Target(max_l1=levels[2]),
            Target(min_psnr=psnr_level), Target(tokens=2 * t), Target(tokens=4 * t), Target(tokens=k * t)]


def workload(corpus, targets, n: int, seed: int) -> list[tuple[torch.Tensor, Target]]:
    rng = random.Random(seed)
    return [(rng.choice(corpus)[1], rng.choice(targets)) for _ in range(n)]


async def drive(engine: Engine, work, arrivals: list[float]) -> dict:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    latencies: list[float] = []
    results = []

    async def one(img, target, at):
        await asyncio.sleep(max(0.0, t0 + at - loop.time()))
        start = loop.time()
        r = await engine.tokenize(img, target)
        latencies.append(loop.time() - start)
        results.append(r)

    decodes0 = engine.pixel_decodes
    await asyncio.gather(*(one(i, t, a) for (i, t), a in zip(work, arrivals)))
    makespan = loop.time() - t0
    lat = np.array(latencies)
    return {
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


def make_engine(loaded, strategy: str, args) -> Engine:
    s = EngineSettings(devices=args.device, policy=strategy, max_batch=args.max_batch, max_queue=100_000,
                       batch_mode=args.batch_mode, halting=not args.no_halting, dtype=args.dtype,
                       lockstep_max_delay=args.max_delay)
    return Engine(loaded, s).start()


def poisson(rate: float, n: int, seed: int) -> list[float]:
    rng = np.random.default_rng(seed)
    return list(np.cumsum(rng.exponential(1.0 / rate, size=n)))


async def bench(args) -> dict:
    loaded = resolve(args.model)
    cfg = loaded.config
    corpus = build_corpus(cfg.img_size, args.crops)
    targets = calibrate_targets(loaded.model, corpus)
    report = {
        "model": {"spec": args.model, "fingerprint": loaded.fingerprint[:16], "img_size": cfg.img_size},
        "machine": {"device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "cpu": platform.processor() or platform.machine()},
        "settings": {"max_batch": args.max_batch, "batch_mode": args.batch_mode, "halting": not args.no_halting,
                     "lockstep_max_delay_s": args.max_delay, "dtype": args.dtype},
        "workload": {"corpus_images": len(corpus), "targets": [t.to_dict() for t in targets]},
        "strategies": {},
    }
    sat_work = workload(corpus, targets, args.saturation_requests, seed=1)
    for name in STRATEGIES:
        n = args.reference_requests if name == "reference" else len(sat_work)
        eng = make_engine(loaded, name, args)
        try:
            res = await drive(eng, sat_work[:n], [0.0] * n)
        finally:
            eng.shutdown()
        report["strategies"][name] = {"saturation": res, "saturation_throughput": res["throughput"], "poisson": []}
        print(f"[saturation] {name:<10} {res['throughput']:7.2f} img/s  p50 {res['p50_s']:.3f}s  "
              f"iters {res['mean_iterations']:.2f}  decodes/img {res['pixel_decodes_per_image']:.2f}", flush=True)

    lock_sat = report["strategies"]["lockstep"]["saturation_throughput"]
    for frac in args.load_fractions:
        rate = frac * lock_sat
        for name in STRATEGIES:
            sat = report["strategies"][name]["saturation_throughput"]
            # an overloaded strategy's queue grows without bound; cap its run length
            n = args.poisson_requests if rate < 0.95 * sat else max(20, int(args.poisson_requests * sat / rate / 2))
            eng = make_engine(loaded, name, args)
            try:
                res = await drive(eng, workload(corpus, targets, n, seed=2), poisson(rate, n, seed=3))
            finally:
                eng.shutdown()
            res.update({"load_fraction_of_lockstep": frac, "offered_rate": rate, "overloaded": rate >= sat})
            report["strategies"][name]["poisson"].append(res)
            if abs(frac - 0.7) < 1e-9:
                report["strategies"][name]["p99_at_70pct_lockstep_load"] = res["p99_s"]
            print(f"[poisson {frac:.0%}] {name:<10} offered {rate:6.2f}/s  got {res['throughput']:6.2f}/s  "
                  f"p50 {res['p50_s']:.3f}s p99 {res['p99_s']:.3f}s", flush=True)

    s = report["strategies"]
    report["ratios"] = {
        "continuous_vs_reference_throughput": s["continuous"]["saturation_throughput"] / s["reference"]["saturation_throughput"],
        "continuous_vs_lockstep_throughput": s["continuous"]["saturation_throughput"] / s["lockstep"]["saturation_throughput"],
    }
    if "p99_at_70pct_lockstep_load" in s["continuous"]:
        report["ratios"]["continuous_vs_lockstep_p99_at_70pct"] = (
            s["continuous"]["p99_at_70pct_lockstep_load"] / s["lockstep"]["p99_at_70pct_lockstep_load"])
    return report


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, s in report["strategies"].items():
        pts = sorted((p["offered_rate"], p["p99_s"], p["p50_s"]) for p in s["poisson"])
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{name} p99")
            ax.plot([p[0] for p in pts], [p[2] for p in pts], marker=".", linestyle="--", alpha=0.6, label=f"{name} p50")
    ax.set_xlabel("offered load (images/s, Poisson)")
    ax.set_ylabel("latency (s)")
    ax.set_yscale("log")
    ax.set_title(f"ALIT engine strategies — {report['model']['spec']} on {report['machine']['device']}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_json(report: dict, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=Settings().model)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-delay", type=float, default=0.010, help="lockstep batcher's max queue delay (s)")
    p.add_argument("--batch-mode", default="cohort", choices=["cohort", "padded"])
    p.add_argument("--no-halting", action="store_true", help="turn 2D-token halting off")
    p.add_argument("--crops", type=int, default=24)
    p.add_argument("--saturation-requests", type=int, default=256)
    p.add_argument("--reference-requests", type=int, default=48)
    p.add_argument("--poisson-requests", type=int, default=200)
    p.add_argument("--load-fractions", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.9])
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="small runs, finishes in about two minutes on 2 CPU cores")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--plot", help="write a latency-vs-load PNG here")
    args = p.parse_args(argv)
    if args.quick:
        args.saturation_requests, args.reference_requests, args.poisson_requests = 128, 24, 96
        args.load_fractions = [0.4, 0.7]
    if args.threads:
        torch.set_num_threads(args.threads)
    report = asyncio.run(bench(args))
    print(json.dumps(report["ratios"], indent=2))
    if args.json:
        write_json(report, args.json)
    if args.plot:
        plot(report, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
