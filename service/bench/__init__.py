"""`alit-serve bench`: the engine benchmark on your own images, for a model of any family.

Builds a workload from a folder (the images, crops at several scales, flat and noise images; targets
calibrated on the model), measures the model's per-stage costs at a full batch, then runs each
strategy on the real in-process engine — `continuous` (this engine), `lockstep` (a request-level
batcher), `reference` (one image at a time, every probe decoded) — at saturation and under
Poisson load, and finally the same strategies on a SIMULATED GPU-like device (see simulate.py) when
its cost model fits the model's probes (successive iterations: ALIT; skipped, and said so, otherwise).

`--families NAME=SPEC,...` runs the comparison of families at the same targets instead (families.py).
The model is used only through the family interface (model/family.py): probes, ladders, limits.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any, cast

import torch

from . import families as families_mod

STRATEGIES = ("reference", "lockstep", "continuous")
DRIFT_WARNING = 0.10  # a change of the profile's per-image cost over a run worth a warning
DEFAULT_IMAGES = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "alit-reference" / "images"


FULL = {"saturation_requests": 256, "reference_requests": 48, "poisson_requests": 200,
        "load_fractions": [0.3, 0.5, 0.7, 0.9]}
QUICK = {"saturation_requests": 128, "reference_requests": 24, "poisson_requests": 96, "load_fractions": [0.4, 0.7]}


def _progress(msg: str, t0: float) -> None:
    print(f"[{time.perf_counter() - t0:7.1f} s] {msg}", flush=True)


def run(args: argparse.Namespace) -> dict:
    from ..engine.admission import admission_mode
    from ..engine.policies import refill_point
    from ..model.precision import precision
    from ..model.registry import resolve
    from ..model.speed import prepare_for_device
    from . import live, profile, simulate, workload

    t0 = time.perf_counter()
    loaded = resolve(args.model)
    model = prepare_for_device(loaded.model, args.device)  # as the engines' first worker runs it (shared)
    model.retry_stricter = args.retry_stricter
    limits = loaded.limits
    img_size = limits.img_size
    halting = not args.no_halting
    images = workload.corpus(workload.load_folder(args.images), args.crops)
    pixels = workload.tensors(images, img_size, limits.resample)
    walk = workload.default_walk(limits)
    _progress(f"model {args.model} ({loaded.family.name} family, {img_size} px) on {args.device}, "
              f"{torch.get_num_threads()} threads; {len(images)} corpus images from {args.images}; measuring "
              + ("every iteration" if walk == list(range(1, len(walk) + 1))
                 else f"probes {_named(limits, walk)}"), t0)
    with precision(args.device, args.dtype):
        measured = workload.measure(model, pixels, [walk], halting, batch=args.max_batch)
        targets = workload.calibrate(measured, limits)
        walks = workload.walks_of(targets, limits)  # the ladders the requests walk: measure what is missing
        more = measured.missing(walks)
        if more:
            keys = sorted({k for w in more for k in w} - set(measured.keys))
            _progress(f"measuring the probes of the targets' ladders: {_named(limits, keys)}", t0)
            measured = measured.merged(workload.measure(model, pixels, more, halting, batch=args.max_batch,
                                                        skip=measured.keys))
        batch = pixels[torch.arange(args.max_batch) % len(pixels)]
        speedups = engine_settings(args).speedups()
        if speedups.changes_model:  # profile (so the efficiency's ideal) the model the engines run, warmed as they are
            from ..model.compile import warm_batch_sizes

            model = cast(Any, prepare_for_device(copy.deepcopy(model), args.device, args.dtype, speedups,
                                                 args.max_batch))  # typed for ALIT; any family's stacks
            for n in warm_batch_sizes(args.max_batch):
                profile.profile_stages(model, batch[:n], walks, halting, repeats=1)
        prof = profile.profile_stages(model, batch, walks, halting)
        one = profile.profile_stages(model, pixels[:1], walks, halting)
        flops = profile.flops_per_image(model, batch, walks, halting) if args.flops else None
    _progress(f"per-image cost at batch {prof.batch}: {prof.describe()}", t0)
    settings = engine_settings(args)
    report: dict = {
        "model": {"spec": args.model, "fingerprint": loaded.fingerprint[:16], "img_size": img_size},
        "machine": {"device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "cpu": platform.processor() or platform.machine(),
                    "gpu": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else None},
        "settings": {"max_batch": args.max_batch, "batch_mode": args.batch_mode, "halting": not args.no_halting,
                     "lockstep_max_delay_s": args.max_delay, "dtype": args.dtype,
                     "admission": admission_mode(args.admission, args.device),
                     "compile": args.compile, "channels_last": args.channels_last, "cuda_graphs": args.cuda_graphs,
                     "repeats": args.repeats, "refill_at": refill_point(args.refill_at, args.device)},
        "workload": {"images": str(args.images), "corpus_images": len(images),
                     "targets": [t.to_dict() for t in targets]},
        "profile": prof.to_dict(),
        "latency_one_image": one.to_dict(),
        "strategies": {},
    }
    if args.retry_stricter:
        report["settings"]["retry_stricter"] = True
    _progress(f"one image alone: {one.describe()}", t0)
    if flops is not None:
        dtype = torch.float32 if args.dtype == "float32" else getattr(torch, args.dtype)
        peak = profile.matmul_peak(args.device, dtype, n=8192 if args.device.startswith("cuda") else 1024)
        achieved = profile.flops_per_pass(flops) / prof.pass_s
        report["flops"] = {"per_image": flops, "matmul_peak_flops": peak,
                           "achieved_flops_at_full_batch": achieved, "model_flop_utilisation": achieved / peak,
                           "note": "every stage at a full batch (the profile) vs one large matmul in the same "
                                   "dtype (TF32 allowed per torch's default for float32)"}
        _progress(f"model FLOP utilisation at batch {prof.batch}: {achieved / 1e12:.2f} TFLOP/s of a measured "
                  f"{peak / 1e12:.1f} TFLOP/s matmul peak = {achieved / peak:.1%}", t0)
    strategies = [s for s in STRATEGIES if s in args.strategies]
    n_sat = args.saturation_requests
    sat = workload.plan_requests(n_sat, len(images), targets, measured, limits, seed=1)
    sat_runs: dict[str, list[dict]] = {name: [] for name in strategies}
    for rep in range(args.repeats):  # strategies interleaved in every round: a slow spell hits them alike
        for name in strategies:
            n = args.reference_requests if name == "reference" else n_sat
            _progress(f"saturation{_round(rep, args.repeats)}: {name}, {n} requests queued at once", t0)
            work = [(pixels[r.image], r.target) for r in sat[:n]]
            res = live.run_strategy(loaded, name, settings, work, [0.0] * n)
            res["ideal_throughput"] = n / prof.ideal_seconds(res["walks"], res["pixel_decodes"])
            res["efficiency"] = res["throughput"] / res["ideal_throughput"]
            sat_runs[name].append(res)
            _progress(f"  {name}: {res['throughput']:.2f} img/s (efficiency {res['efficiency']:.0%}), "
                      f"p50 {res['p50_s']:.3f} s, {res['mean_iterations']:.2f} probes and "
                      f"{res['pixel_decodes_per_image']:.2f} decodes per image", t0)
    for name, runs in sat_runs.items():
        report["strategies"][name] = {
            "saturation": _median_run(runs, "throughput"),
            "saturation_throughput": statistics.median(r["throughput"] for r in runs),
            "efficiency": statistics.median(r["efficiency"] for r in runs),
            "saturation_runs": [r["throughput"] for r in runs], "poisson": []}
    if "lockstep" in report["strategies"]:
        lock_sat = report["strategies"]["lockstep"]["saturation_throughput"]

        def work_for(n: int) -> list:
            return [(pixels[r.image], r.target) for r in workload.plan_requests(n, len(images), targets, measured,
                                                                                  limits, seed=2)]

        for frac in args.load_fractions:
            label = f"Poisson {frac:.0%} of lock-step ({frac * lock_sat:.2f}/s)"
            for name, res in _poisson_runs(args, loaded, settings, report["strategies"], frac * lock_sat, work_for,
                                           label, t0).items():
                res["load_fraction_of_lockstep"] = frac
                s = report["strategies"][name]
                s["poisson"].append(res)
                if abs(frac - 0.7) < 1e-9:
                    s["p50_at_70pct_lockstep_load"] = res["p50_s"]
                    s["p99_at_70pct_lockstep_load"] = res["p99_s"]
    for s in report["strategies"].values():
        for k in ("iterations", "pixel_decodes", "walks"):
            s["saturation"].pop(k, None)
    report["ratios"] = ratios(report["strategies"])
    if strategies:  # a shared machine's speed can change under a run: say so, from the same profile again
        with precision(args.device, args.dtype):
            after = profile.profile_stages(model, batch, walks, halting)
        drift = after.pass_s / prof.pass_s - 1
        report["profile_after"] = after.to_dict()
        report["machine"]["speed_drift"] = drift
        _progress(f"profile again after the runs: per-image cost {drift:+.0%} against the start" + (
            f" -- the machine's speed changed by more than {DRIFT_WARNING:.0%} during this run (other load?): "
            "efficiencies are off by as much; compare strategies within one run, and repeat the run"
            if abs(drift) > DRIFT_WARNING else ""), t0)
    why_not = simulate.unusable(limits) if prof.successive else (
        "the profile's probes are not successive iterations of one walk: "
        + profile.probe_names(list(prof.probe_s), prof.meaning))
    if args.simulate and why_not is not None:
        report["simulated"] = {"skipped": "the simulated device models a walk of equal-cost iterations (ALIT's "
                                          f"cost curve, calibrated to an H100); not this model: {why_not}"}
        _progress(f"SIMULATED device skipped: {report['simulated']['skipped']}", t0)
    elif args.simulate:
        _progress("SIMULATED device (virtual clock, cost curve calibrated to an H100): saturation batches "
                  + ", ".join(map(str, args.sim_saturation)), t0)
        reqs = workload.plan_requests(4000, len(images), targets, measured, limits, seed=4)
        report["simulated"] = {
            "note": "SIMULATED, not measured: the real scheduler on a stand-in device with a virtual clock; "
                    "see service/bench/simulate.py for the cost curve",
            "runs": [simulate.compare(reqs, limits, sb, refill_at=refill_point(args.refill_at, "cuda"))  # GPU-like
                     for sb in args.sim_saturation],
        }
        for r in report["simulated"]["runs"]:
            _progress(f"  simulated, saturation batch {r['saturation_batch']}: " + ", ".join(
                f"{n} {r[n]['saturation_throughput']:.0f} img/s" for n in STRATEGIES if n in r), t0)
    _progress("done", t0)
    return report


def engine_settings(args: argparse.Namespace, policy: str = "continuous"):
    """The engine's settings from the command line (`--device` goes to `devices`)."""
    from ..engine import EngineSettings

    return EngineSettings(devices=args.device, max_batch=args.max_batch, max_queue=1_000_000, policy=policy,
                          batch_mode=args.batch_mode, halting=not args.no_halting, dtype=args.dtype,
                          lockstep_max_delay=args.max_delay, admission=args.admission, compile=args.compile,
                          refill_at=args.refill_at, channels_last=args.channels_last, cuda_graphs=args.cuda_graphs)


def _poisson_runs(args, loaded, settings, saturated: dict, rate: float, work_for, label: str,
                  t0: float) -> dict[str, dict]:
    """Every strategy of `saturated` (its saturation results) under Poisson arrivals at `rate`,
    `args.repeats` rounds with the strategies interleaved, `work_for(n)` the n requests; per strategy
    the first run's record with each figure's median and every run kept. A strategy that `rate`
    overloads runs fewer requests: its queue only grows."""
    from . import live, workload

    got: dict[str, list[dict]] = {name: [] for name in saturated}
    for rep in range(args.repeats):
        for name in saturated:
            n, sat_tp = args.poisson_requests, saturated[name]["saturation_throughput"]
            if rate >= 0.95 * sat_tp:
                n = max(20, int(n * sat_tp / rate / 2))
            _progress(f"{label}{_round(rep, args.repeats)}: {name}, {n} requests", t0)
            res = live.run_strategy(loaded, name, settings, work_for(n), workload.poisson(rate, n, seed=3))
            for k in ("iterations", "pixel_decodes", "walks"):
                res.pop(k)
            res.update({"offered_rate": rate, "overloaded": rate >= sat_tp})
            got[name].append(res)
            _progress(f"  {name}: got {res['throughput']:.2f}/s, p50 {res['p50_s']:.3f} s, "
                      f"p99 {res['p99_s']:.3f} s", t0)
    keys = ("throughput", "p50_s", "p99_s")  # medians per figure, as the docs' tables
    return {name: {**runs[0], **{k: statistics.median(r[k] for r in runs) for k in keys},
                   "runs": [{k: r[k] for k in keys} for r in runs]} for name, runs in got.items()}


def _named(limits, keys: list[int]) -> str:
    """Probe keys with what each means, the first few of them."""
    from .profile import probe_names

    return probe_names(keys, {k: limits.describe(k) for k in keys})


def _round(rep: int, repeats: int) -> str:
    return f" (round {rep + 1} of {repeats})" if repeats > 1 else ""


def _median_run(runs: list[dict], key: str) -> dict:
    """The run whose `key` is the median (the lower middle one for an even count)."""
    return sorted(runs, key=lambda r: r[key])[(len(runs) - 1) // 2]


def ratios(strategies: dict) -> dict:
    out = {}
    c, lk, ref = (strategies.get(n) for n in ("continuous", "lockstep", "reference"))
    if c and ref:
        out["continuous_vs_reference_throughput"] = c["saturation_throughput"] / ref["saturation_throughput"]
    if c and lk:
        out["continuous_vs_lockstep_throughput"] = c["saturation_throughput"] / lk["saturation_throughput"]
        for q in ("p50", "p99"):
            key = f"{q}_at_70pct_lockstep_load"
            if key in c and key in lk:
                out[f"continuous_vs_lockstep_{q}_at_70pct"] = c[key] / lk[key]
    return out


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, s in report["strategies"].items():
        pts = sorted((p["offered_rate"], p["p99_s"], p["p50_s"]) for p in s["poisson"])
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{name} p99")
            ax.plot([p[0] for p in pts], [p[2] for p in pts], marker=".", linestyle="--", alpha=0.6,
                    label=f"{name} p50")
    ax.set_xlabel("offered load (images/s, Poisson)")
    ax.set_ylabel("latency (s)")
    ax.set_yscale("log")
    ax.set_title(f"Engine strategies — {report['model']['spec']} on {report['machine']['device']}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..engine.admission import ADMISSIONS
    from ..engine.policies import refill_setting
    from ..model.compile import compile_scope
    from ..model.config import BATCH_MODES
    from ..settings import Settings

    p.add_argument("--images", default=str(DEFAULT_IMAGES), help="folder of images the workload is built from")
    p.add_argument("--model", default=Settings().model)
    p.add_argument("--strategies", default=",".join(STRATEGIES),
                   help="comma-separated subset of " + ",".join(STRATEGIES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-delay", type=float, default=0.010, help="lock-step batcher's max queue delay (s)")
    p.add_argument("--batch-mode", default="packed", choices=BATCH_MODES)
    p.add_argument("--refill-at", type=refill_setting, default=Settings().refill_at,
                   help="continuous batching, saturated: admit once the running images are down to this fraction of "
                        "the batch; auto: 0.25 on a CPU, 1 on a GPU (ALIT_REFILL_AT)")
    p.add_argument("--admission", default=Settings().admission, choices=list(ADMISSIONS),
                   help="continuous batching's in-flight limit below saturation: max_batch, or the knee of a cost "
                        "curve measured at warm-up; auto: measured on a CPU, max_batch on a GPU (ALIT_ADMISSION)")
    p.add_argument("--compile", nargs="?", const="all", default="off", type=compile_scope,
                   help="torch.compile: off, vqgan (the convolution stacks) or all (bare flag: all; ALIT_COMPILE)")
    p.add_argument("--channels-last", action="store_true",
                   help="the convolution stacks in channels-last memory format (ALIT_CHANNELS_LAST)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="the convolution stacks as CUDA graphs over batch buckets, CUDA only (ALIT_CUDA_GRAPHS)")
    p.add_argument("--no-halting", action="store_true", help="turn 2D-token halting off")
    p.add_argument("--crops", type=int, default=24)
    p.add_argument("--saturation-requests", type=int, help="default 256 (--quick: 128)")
    p.add_argument("--reference-requests", type=int, help="default 48 (--quick: 24)")
    p.add_argument("--poisson-requests", type=int, help="default 200 (--quick: 96)")
    p.add_argument("--load-fractions", type=float, nargs="+", help="of lock-step's saturation throughput; "
                   "default 0.3 0.5 0.7 0.9 (--quick: 0.4 0.7)")
    p.add_argument("--flops", action="store_true",
                   help="count FLOPs and report utilisation against a measured matmul peak")
    p.add_argument("--no-simulate", dest="simulate", action="store_false", help="skip the simulated-device runs")
    p.add_argument("--sim-saturation", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--repeats", type=int, default=1,
                   help="measure every run this many times, the strategies interleaved in each round, and "
                        "report medians (the runs are kept in the JSON)")
    p.add_argument("--retry-stricter", action="store_true",
                   help="conditioned families (KARL): a missed target runs again at the next stricter "
                        "conditioning (the model's retry_stricter)")
    p.add_argument("--quick", action="store_true", help="small runs (a few minutes on 2 CPU cores)")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--plot", help="write a latency-vs-load PNG here")
    g = p.add_argument_group("families at the same targets (instead of the strategies benchmark)")
    g.add_argument("--families", metavar="NAME=SPEC,...",
                   help="compare these models (any family; e.g. alit=preset:alit_small,karl=preset:karl_small): "
                        "the same images at each model's size, every image through the engine (continuous "
                        "batching, all queued at once) at each --targets level; uses --images, --crops, "
                        "--device, --dtype, --max-batch, --batch-mode, --repeats, --retry-stricter, --json")
    g.add_argument("--targets", default=",".join(map(str, families_mod.DEFAULT_TARGETS)),
                   help="comma-separated max_l1 targets for --families (default %(default)s)")


def main(args: argparse.Namespace) -> int:
    from ..model.speed import Speedups, check_speedups
    from ..model.transformer import check_batch_mode

    if args.repeats < 1:
        raise SystemExit(f"--repeats must be at least 1 (got {args.repeats})")
    try:  # what would stop an engine's start, said before any measuring
        check_batch_mode(args.batch_mode, args.device, args.dtype)
        check_speedups(Speedups.of(args.channels_last, args.compile, args.cuda_graphs), args.device)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.families:
        return families_mod.main(args)
    defaults = QUICK if args.quick else FULL
    for k, v in defaults.items():  # what the command line did not set
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = set(args.strategies) - set(STRATEGIES)
    if unknown:
        raise SystemExit(f"unknown strategies {sorted(unknown)} (known: {', '.join(STRATEGIES)})")
    report = run(args)
    print(json.dumps(report["ratios"], indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot(report, args.plot)
    return 0


__all__ = ["DEFAULT_IMAGES", "add_arguments", "engine_settings", "main", "run"]
