"""Long fault scenarios on loopback, with figures for docs/reliability.md (`make reliability`).

Each scenario starts its own service (and Redis), drives concurrent traffic with httpx, injects the
fault, and reports: requests sent, failed (anything but the documented answer), 503s, p99 latency
during the fault, peak RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "loadtest"))
sys.path.insert(0, str(ROOT / "tests"))
import corpus  # noqa: E402
from run_load import _free_port, _metric  # noqa: E402

IMAGES = [corpus.png(img) for _, img in corpus.corpus(40, seed=3)]
TARGETS = [{"max_l1": "0.0001", "max_tokens": "128"}, {"tokens": "64"}, {"tokens": "256"}, {"min_psnr": "3"}]


class Service:
    def __init__(self, tmp: Path, redis: bool = True, **settings):
        from conftest import redis_binary

        self.tmp = tmp
        self.redis_port = _free_port()
        self.redis = None
        self.redis_cmd = [redis_binary(), "--port", str(self.redis_port), "--save", "", "--appendonly", "no", "--dir", str(tmp)]
        port = _free_port()
        env = {**os.environ, "ALIT_PORT": str(port), **{f"ALIT_{k.upper()}": str(v) for k, v in settings.items()}}
        if redis:
            self.start_redis()
            env["ALIT_REDIS_URL"] = f"redis://127.0.0.1:{self.redis_port}/0"
        self.proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve"], cwd=ROOT, env=env,
                                     stdout=open(tmp / f"server-{port}.log", "w"), stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        raise RuntimeError("service did not start")

    def start_redis(self):
        self.redis = subprocess.Popen(self.redis_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.3)

    def kill_redis(self):
        self.redis.kill()
        self.redis.wait()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=60)
        if self.redis and self.redis.poll() is None:
            self.redis.kill()


class Recorder:
    def __init__(self):
        self.rows: list[tuple[float, int, float, str]] = []  # (t, status, latency, phase)
        self.phase = "before"
        self.rss_peak = 0.0

    def summary(self, phase: str | None = None) -> dict:
        rows = [r for r in self.rows if phase is None or r[3] == phase]
        lat = [r[2] for r in rows]
        codes: dict[str, int] = {}
        for r in rows:
            codes[str(r[1])] = codes.get(str(r[1]), 0) + 1
        return {"requests": len(rows), "status": codes,
                "p99_s": float(np.percentile(lat, 99)) if lat else None,
                "p50_s": float(np.percentile(lat, 50)) if lat else None}


async def drive(url: str, rec: Recorder, seconds: float, concurrency: int, repeat: float = 0.5,
                headers_fn=None) -> None:
    end = time.monotonic() + seconds
    hot = IMAGES[:8]
    async with httpx.AsyncClient(timeout=60) as c:
        async def worker(i):
            rng = random.Random(i)
            while time.monotonic() < end:
                img = rng.choice(hot) if rng.random() < repeat else rng.choice(IMAGES)
                headers = headers_fn(rng) if headers_fn else {}
                t = time.monotonic()
                try:
                    r = await c.post(url + "/v1/tokenize", files={"file": ("a.png", img)}, data=rng.choice(TARGETS),
                                     headers=headers)
                    status = r.status_code
                except httpx.TransportError:
                    status = -1
                rec.rows.append((t, status, time.monotonic() - t, rec.phase))

        async def rss():
            while time.monotonic() < end:
                try:
                    rec.rss_peak = max(rec.rss_peak, _metric(url, "process_resident_memory_bytes"))
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.5)

        await asyncio.gather(rss(), *(worker(i) for i in range(concurrency)))


async def _phases(rec: Recorder, plan: list[tuple[float, str, object]]) -> None:
    for delay, phase, action in plan:
        await asyncio.sleep(delay)
        rec.phase = phase
        if action:
            action()


def scenario_redis(tmp: Path, seconds: float) -> dict:
    svc = Service(tmp)
    rec = Recorder()
    try:
        async def go():
            third = seconds / 3
            await asyncio.gather(drive(svc.url, rec, seconds, 8, repeat=0.8),
                                 _phases(rec, [(third, "redis down", svc.kill_redis),
                                               (third, "redis back", svc.start_redis)]))
        asyncio.run(go())
        hits = _metric(svc.url, "alit_cache_requests_total", result="hit")
        out = {phase: rec.summary(phase) for phase in ("before", "redis down", "redis back")}
        out.update(total=rec.summary(), cache_errors=_metric(svc.url, "alit_cache_errors_total"), cache_hits=hits,
                   rss_peak_bytes=rec.rss_peak)
        return out
    finally:
        svc.stop()


def scenario_overload(tmp: Path, seconds: float) -> dict:
    svc = Service(tmp, redis=False, max_queue=16, max_batch=8)
    rec = Recorder()
    try:
        rec.phase = "3x overload"
        asyncio.run(drive(svc.url, rec, seconds, 48, repeat=0.0))  # capacity 8 + 16 queued: 48 clients = 2-3x
        rec.phase = "recovery"
        asyncio.run(drive(svc.url, rec, seconds / 2, 4, repeat=0.0))
        return {"3x overload": rec.summary("3x overload"), "recovery": rec.summary("recovery"), "rss_peak_bytes": rec.rss_peak}
    finally:
        svc.stop()


def scenario_sigterm(tmp: Path, seconds: float) -> dict:
    svc = Service(tmp, redis=False, max_batch=8, drain_seconds=60)
    rec = Recorder()

    async def go():
        await asyncio.gather(drive(svc.url, rec, seconds, 16, repeat=0.0),
                             _phases(rec, [(seconds / 2, "after SIGTERM", lambda: svc.proc.send_signal(signal.SIGTERM))]))

    try:
        asyncio.run(go())
        code = svc.proc.wait(timeout=90)
        return {"before": rec.summary("before"), "after SIGTERM": rec.summary("after SIGTERM"), "exit_code": code,
                "rss_peak_bytes": rec.rss_peak}
    finally:
        svc.stop()


def scenario_fault(tmp: Path, seconds: float) -> dict:
    svc = Service(tmp, redis=False, fault_injection="true")
    rec = Recorder()
    try:
        asyncio.run(drive(svc.url, rec, seconds, 8, repeat=0.0,
                          headers_fn=lambda rng: {"X-Alit-Fault": "step"} if rng.random() < 0.02 else {}))
        return {"total": rec.summary(), "step_failures": _metric(svc.url, "alit_rejected_total", reason="step_failed"),
                "ready_after": httpx.get(svc.url + "/readyz").status_code, "rss_peak_bytes": rec.rss_peak}
    finally:
        svc.stop()


SCENARIOS = {"redis": scenario_redis, "overload": scenario_overload, "sigterm": scenario_sigterm, "fault": scenario_fault}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--only", nargs="*", choices=list(SCENARIOS))
    p.add_argument("--json", default="docs/reliability.json")
    a = p.parse_args(argv)
    results = {}
    for name in a.only or SCENARIOS:
        tmp = Path(tempfile.mkdtemp(prefix=f"alit-{name}-"))
        t = time.monotonic()
        results[name] = SCENARIOS[name](tmp, a.seconds)
        results[name]["wall_s"] = time.monotonic() - t
        print(name, json.dumps(results[name], indent=1), flush=True)
    Path(a.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
