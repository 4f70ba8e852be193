"""Headless load run: start the service (+ its own Redis) or target a URL, step through load levels
with Locust, and write a report (throughput, p50/p95/p99, error mix, cache hit ratio) and a plot.

    python loadtest/run_load.py --users 2 4 8 16 --seconds 30 --out docs/loadtest     # `make loadtest`
    python loadtest/run_load.py --url http://my-deployment:8000 --users 8 32
    python loadtest/run_load.py --env ALIT_SCHEDULING=lockstep --out docs/loadtest/lockstep  # a baseline
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metric(url: str, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def start_local(tmp: Path, model: str | None, extra_env: dict[str, str]) -> tuple[str, list[subprocess.Popen]]:
    from conftest import redis_binary

    rport, port = _free_port(), _free_port()
    redis = subprocess.Popen([redis_binary(), "--port", str(rport), "--save", "", "--appendonly", "no", "--dir", str(tmp)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {**os.environ, **extra_env, "ALIT_PORT": str(port), "ALIT_REDIS_URL": f"redis://127.0.0.1:{rport}/0"}
    if model:
        env["ALIT_MODEL"] = model
    server = subprocess.Popen([sys.executable, "-m", "service.cli", "serve"], cwd=ROOT, env=env,
                              stdout=open(tmp / "server.log", "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return url, [server, redis]
        except httpx.HTTPError:
            time.sleep(0.3)
    raise RuntimeError("service did not become ready")


def run_level(url: str, users: int, seconds: int, prefix: Path) -> dict:
    hits0, miss0 = _metric(url, "alit_cache_requests_total", result="hit"), _metric(url, "alit_cache_requests_total", result="miss")
    subprocess.run([sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "locustfile.py"), "--headless",
                    "-u", str(users), "-r", str(users), "-t", f"{seconds}s", "--host", url, "--csv", str(prefix),
                    "--only-summary"], check=False, capture_output=True, timeout=seconds + 120)
    with open(f"{prefix}_stats.csv") as f:
        rows = {r["Name"]: r for r in csv.DictReader(f)}
    agg = rows["Aggregated"]
    errors: dict[str, int] = {}
    if Path(f"{prefix}_failures.csv").exists():
        with open(f"{prefix}_failures.csv") as f:
            for r in csv.DictReader(f):
                errors[r["Error"][:60]] = errors.get(r["Error"][:60], 0) + int(r["Occurrences"])
    hits = _metric(url, "alit_cache_requests_total", result="hit") - hits0
    misses = _metric(url, "alit_cache_requests_total", result="miss") - miss0
    return {
        "users": users, "seconds": seconds, "requests": int(agg["Request Count"]), "failures": int(agg["Failure Count"]),
        "throughput_rps": float(agg["Requests/s"]), "p50_ms": float(agg["50%"]), "p95_ms": float(agg["95%"]),
        "p99_ms": float(agg["99%"]), "errors": errors, "cache_hit_ratio": hits / max(1.0, hits + misses),
        "rss_bytes": _metric(url, "process_resident_memory_bytes"),
    }


def plot(levels: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    u = [lv["users"] for lv in levels]
    a.plot(u, [lv["throughput_rps"] for lv in levels], marker="o")
    a.set_xlabel("concurrent users")
    a.set_ylabel("requests/s")
    a.set_title("throughput")
    for q in ("p50_ms", "p95_ms", "p99_ms"):
        b.plot(u, [lv[q] for lv in levels], marker="o", label=q[:3])
    b.set_xlabel("concurrent users")
    b.set_ylabel("latency (ms)")
    b.set_yscale("log")
    b.legend()
    b.set_title("latency")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="target a running deployment instead of starting one")
    p.add_argument("--model", help="ALIT_MODEL for the local service")
    p.add_argument("--users", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--seconds", type=int, default=30)
    p.add_argument("--out", default="docs/loadtest")
    p.add_argument("--env", nargs="*", default=[], metavar="ALIT_X=VALUE",
                   help="settings for the local service, e.g. ALIT_SCHEDULING=lockstep")
    a = p.parse_args(argv)
    bad = [e for e in a.env if "=" not in e]
    if bad:
        p.error(f"--env takes NAME=VALUE, got {bad}")
    extra_env = dict(e.split("=", 1) for e in a.env)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="alit-load-"))
    procs: list[subprocess.Popen] = []
    url = a.url
    if url is None:
        url, procs = start_local(tmp, a.model, extra_env)
    try:
        levels = []
        for users in a.users:
            lv = run_level(url, users, a.seconds, tmp / f"u{users}")
            levels.append(lv)
            print(f"{users:>3} users: {lv['throughput_rps']:.1f} req/s  p50 {lv['p50_ms']:.0f} ms  p95 {lv['p95_ms']:.0f} ms  "
                  f"p99 {lv['p99_ms']:.0f} ms  failures {lv['failures']}  cache hits {lv['cache_hit_ratio']:.0%}", flush=True)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=60)
    (out / "report.json").write_text(json.dumps({"url": url if a.url else "local", "env": extra_env, "levels": levels}, indent=2) + "\n")
    plot(levels, out / "report.png")
    print(f"wrote {out / 'report.json'} and {out / 'report.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
