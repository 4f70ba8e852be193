"""In-process engine vs the same model on Triton Inference Server, same workload, same machine.

  in-process  `Engine` (continuous batching, per-image halting) in this process;
  triton      a real `tritonserver` (nvidia-pytriton wheel) on model_repository/: dynamic batching
              into the decoupled Python backend, which runs the same engine; driven through
              `TritonEngine`, the gRPC client `ALIT_ENGINE=triton` uses (one stream per image,
              preprocessed pixels), final response only;
  triton+traj the same with one response per iteration (ALL_ITERATIONS), which is what the API's
              cache asks for under ALIT_ENGINE=triton.

Workload, targets and arrivals are `alit-serve bench`'s (service/bench; calibrated on the model measured): one
saturation run (everything queued at t=0), then Poisson arrivals at fractions of the in-process
saturation throughput. Both sides use the same number of torch threads.

    python loadtest/bench_triton.py --threads 1 --json docs/bench_triton_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "loadtest"))

from service.bench import DEFAULT_IMAGES, workload  # noqa: E402
from service.bench.live import drive
from service.bench.workload import poisson  # noqa: E402
from service.engine import Engine, EngineSettings  # noqa: E402
from service.engine.triton_client import TritonEngine  # noqa: E402
from service.model.alit import ALITLimits  # noqa: E402
from service.model.registry import resolve  # noqa: E402
from service.settings import Settings  # noqa: E402


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_triton(model: str, threads: int, max_batch: int, log: Path):
    """A tritonserver on model_repository/ serving `model`; returns (process, ports) once ready."""
    from service.triton_launcher import TritonPorts, start_ready

    ports = TritonPorts(free_port(), free_port(), free_port())
    env = {"ALIT_MODEL": model, "ALIT_TORCH_THREADS": str(threads), "ALIT_MAX_BATCH": str(max_batch)}
    return start_ready(Path(tempfile.mkdtemp(prefix="triton-runtime-")), ports, log, extra_env=env), ports


def triton_batching(metrics_port: int) -> dict:
    """Triton's own counters for the model: requests and execute() calls."""
    import httpx

    out = {}
    for line in httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text.splitlines():
        for name in ("nv_inference_count", "nv_inference_exec_count"):
            if line.startswith(name + "{") and 'model="alit"' in line:
                out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


async def run_side(engine, sat_work, arrivals_runs) -> dict:
    side = {"saturation": await drive(engine, sat_work, [0.0] * len(sat_work)), "poisson": []}
    for frac, rate, work, arrivals in arrivals_runs:
        res = await drive(engine, work, arrivals)
        res.update({"load_fraction": frac, "offered_rate": rate})
        side["poisson"].append(res)
    return side


class WithTrajectory:
    """Tokenize asking for every iteration's tokens, as the API's cache does."""

    pixel_decodes = 0

    def __init__(self, engine):
        self.engine = engine

    async def tokenize(self, image, target):
        return await self.engine.tokenize(image, target, trajectory=True)


def show(name: str, side: dict) -> None:
    s = side["saturation"]
    print(f"[saturation] {name:<10} {s['throughput']:7.2f} img/s  p50 {s['p50_s']:.3f}s  p99 {s['p99_s']:.3f}s",
          flush=True)
    for p in side["poisson"]:
        print(f"[poisson {p['load_fraction']:.0%}] {name:<10} offered {p['offered_rate']:6.2f}/s  "
              f"got {p['throughput']:6.2f}/s  p50 {p['p50_s']:.3f}s  p99 {p['p99_s']:.3f}s", flush=True)


async def bench(args) -> dict:
    loaded = resolve(args.model)
    limits = ALITLimits(loaded.config.tokens_per_iter, loaded.config.max_iters)
    pixels = workload.tensors(workload.corpus(workload.load_folder(DEFAULT_IMAGES), args.crops), loaded.config.img_size)
    l1, psnr = workload.measure_iterations(loaded.model, pixels, halting=True)
    targets = workload.calibrate_targets(l1, psnr, limits)

    def work(n: int, seed: int):
        return [(pixels[r.image], r.target) for r in workload.requests(n, len(pixels), targets, l1, psnr, limits, seed)]

    sat_work = work(args.saturation_requests, seed=1)
    settings = EngineSettings(devices="cpu", max_batch=args.max_batch, max_queue=100_000)
    report = {
        "model": {"spec": args.model, "fingerprint": loaded.fingerprint[:16], "img_size": loaded.config.img_size},
        "machine": {"torch": torch.__version__, "threads": args.threads, "cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count()},
        "settings": {"max_batch": args.max_batch, "requests_saturation": args.saturation_requests,
                     "requests_poisson": args.poisson_requests},
        "sides": {},
    }

    local = Engine(loaded, settings).start()
    try:
        # the Poisson rates are fractions of the in-process saturation throughput, for both sides
        first = await drive(local, sat_work, [0.0] * len(sat_work))
        runs = [(f, f * first["throughput"], work(args.poisson_requests, seed=2),
                 poisson(f * first["throughput"], args.poisson_requests, seed=3)) for f in args.load_fractions]
        report["sides"]["in-process"] = await run_side(local, sat_work, runs)
    finally:
        local.shutdown()
    show("in-process", report["sides"]["in-process"])

    log = Path(tempfile.mkdtemp(prefix="bench-triton-")) / "tritonserver.log"
    proc, ports = start_triton(args.model, args.threads, args.max_batch, log)
    try:
        remote = TritonEngine(loaded, f"127.0.0.1:{ports.grpc}", local=EngineSettings(
            devices="cpu", warmup=False, max_queue=100_000, max_batch=args.max_batch)).start()
        try:
            await drive(remote, sat_work[:32], [0.0] * 32)  # warm the channel and Triton's instance
            before = triton_batching(ports.metrics)
            report["sides"]["triton"] = await run_side(remote, sat_work, runs)
            after = triton_batching(ports.metrics)
            report["sides"]["triton+traj"] = await run_side(WithTrajectory(remote), sat_work, runs)
        finally:
            remote.shutdown()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    count = after["nv_inference_count"] - before["nv_inference_count"]
    execs = after["nv_inference_exec_count"] - before["nv_inference_exec_count"]
    report["sides"]["triton"]["triton_batching"] = {"requests": count, "executes": execs,
                                                    "mean_requests_per_execute": count / max(1.0, execs)}
    show("triton", report["sides"]["triton"])
    show("triton+traj", report["sides"]["triton+traj"])
    print(f"[triton] {count:.0f} requests in {execs:.0f} execute() calls", flush=True)
    a = report["sides"]["in-process"]
    report["ratios"] = {}
    for name in ("triton", "triton+traj"):
        b = report["sides"][name]
        report["ratios"][f"{name}_vs_in_process_throughput"] = b["saturation"]["throughput"] / a["saturation"]["throughput"]
        for pa, pb in zip(a["poisson"], b["poisson"]):
            report["ratios"][f"{name}_vs_in_process_p50_at_{pa['load_fraction']:.0%}"] = pb["p50_s"] / pa["p50_s"]
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=Settings().model)
    p.add_argument("--threads", type=int, default=1, help="torch threads, in this process and in Triton's")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--crops", type=int, default=24)
    p.add_argument("--saturation-requests", type=int, default=192)
    p.add_argument("--poisson-requests", type=int, default=120)
    p.add_argument("--load-fractions", type=float, nargs="+", default=[0.4, 0.7])
    p.add_argument("--json", help="write the report here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = asyncio.run(bench(args))
    print(json.dumps(report["ratios"], indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
