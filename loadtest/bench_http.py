"""HTTP benchmark of the whole service (`make bench-http`): cache hits and misses for a small PNG and a
12 MP JPEG at 8 and 16 concurrent clients, and the resident memory under a burst of 32 concurrent
7000x5000 JPEGs.

Starts `alit-serve serve` (the shipped model unless --model, its own Redis as the cache) and drives it:
- hits: ApacheBench (`ab -k`, keep-alive, C, little CPU of its own) posting one image that is already
  cached, for --seconds at each concurrency;
- misses: an asyncio httpx client posting images no request has sent before (each a different
  square of the photo inverted, so every one is computed), for --seconds at each concurrency;
- burst: 32 different 7000x5000 JPEGs at once; the server's resident set is sampled from /proc every
  10 ms (peak) and read again 3 s after the burst (what it kept).

Images: the small PNG is a held-out photo at 64 px; the JPEGs are a held-out photo resized to
4000x3000 (quality 90) and 7000x5000 (quality 25, about 0.5 MB). Load generator and server share the
machine, so the figures include the client's CPU.

    python loadtest/bench_http.py --json docs/bench_http.json
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
PHOTO = ROOT / "tests" / "fixtures" / "alit-reference" / "images" / "coco" / "val2017_000000000632.jpg"
BOUNDARY = "alitbenchboundary7d1a"


def encode(arr: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


def base(size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.open(PHOTO).convert("RGB").resize(size, Image.LANCZOS))


def variant(arr: np.ndarray, i: int) -> np.ndarray:
    """The photo with the i-th square of a grid (1/60 of its centre square) inverted: a different model input
    for every i (the square survives the resize to the model's size)."""
    out = arr.copy()
    h, w = arr.shape[:2]
    side = min(h, w)  # the centre square the model's crop keeps
    b = max(2, side // 60)
    cols = side // b
    r, c = (h - side) // 2 + (i // cols) * b, (w - side) // 2 + (i % cols) * b
    out[r:r + b, c:c + b] = 255 - out[r:r + b, c:c + b]
    return out


def multipart(data: bytes, name: str, fields: dict) -> bytes:
    parts = [f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
             f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n"]
    for k, v in fields.items():
        parts.append(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def start(tmp: Path, model: str | None, threads: int, extra_env: dict) -> tuple[str, list[subprocess.Popen]]:
    from conftest import free_port, redis_binary, wait_http

    rport, port = free_port(), free_port()
    redis = subprocess.Popen([redis_binary(), "--port", str(rport), "--save", "", "--appendonly", "no", "--dir", str(tmp)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {**os.environ, "ALIT_PORT": str(port), "ALIT_REDIS_URL": f"redis://127.0.0.1:{rport}/0",
           "ALIT_DEVICES": "cpu", "ALIT_TORCH_THREADS": str(threads), **extra_env}
    if model:
        env["ALIT_MODEL"] = model
    server = subprocess.Popen([sys.executable, "-m", "service.cli", "serve"], cwd=ROOT, env=env,
                              stdout=open(tmp / "server.log", "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/readyz", server, timeout=180, log=tmp / "server.log")
    return url, [server, redis]


def ab(url: str, body: Path, clients: int, seconds: int) -> dict:
    """ab -k for `seconds` (at most 10^6 requests) -> rate, latency percentiles, failures."""
    out = subprocess.run(["ab", "-k", "-q", "-c", str(clients), "-t", str(seconds), "-n", "1000000", "-p", str(body),
                          "-T", f"multipart/form-data; boundary={BOUNDARY}", url + "/v1/tokenize"],
                         capture_output=True, text=True, timeout=seconds + 120)
    text = out.stdout
    if out.returncode != 0:
        raise RuntimeError(f"ab failed: {out.stderr[-500:]}")

    def num(pattern):
        m = re.search(pattern, text)
        return float(m.group(1)) if m else None

    pct = {int(p): float(v) for p, v in re.findall(r"^\s+(\d+)%\s+(\d+)", text, re.M)}
    # ab counts a response whose length differs from the first as failed ("Length"): the timings in the
    # JSON vary, so only connect / receive / exception failures are failures here
    broken = re.search(r"\(Connect: (\d+), Receive: (\d+), Length: (\d+), Exceptions: (\d+)\)", text)
    failed = sum(int(broken.group(i)) for i in (1, 2, 4)) if broken else int(num(r"Failed requests:\s+(\d+)"))
    return {"requests": int(num(r"Complete requests:\s+(\d+)")), "failed": failed,
            "non_2xx": int(num(r"Non-2xx responses:\s+(\d+)") or 0), "req_per_s": num(r"Requests per second:\s+([\d.]+)"),
            "p50_ms": pct.get(50), "p99_ms": pct.get(99), "max_ms": pct.get(100)}


async def misses(url: str, bodies: list[bytes], clients: int, seconds: float) -> dict:
    """Each request a never-seen image; `clients` concurrent, until time or images run out."""
    it = iter(bodies)
    lat, codes = [], {}
    t_end = time.monotonic() + seconds

    async def worker(c: httpx.AsyncClient):
        while time.monotonic() < t_end:
            body = next(it, None)
            if body is None:
                return
            t = time.perf_counter()
            r = await c.post(url + "/v1/tokenize", content=body,
                             headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
            lat.append((time.perf_counter() - t) * 1e3)
            codes[r.status_code] = codes.get(r.status_code, 0) + 1
            if r.status_code == 200:
                assert not r.json()["results"][0]["cached"], "a miss request was a cache hit"

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=clients)) as c:
        await asyncio.gather(*(worker(c) for _ in range(clients)))
    wall = time.perf_counter() - t0
    lat.sort()
    return {"requests": len(lat), "statuses": codes, "req_per_s": round(len(lat) / wall, 2),
            "p50_ms": round(lat[len(lat) // 2], 1), "p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 1)}


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) * 1024


async def burst(url: str, pid: int, bodies: list[bytes]) -> dict:
    before = rss(pid)
    peak, stop = before, threading.Event()

    def sample():
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, rss(pid))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=len(bodies))) as c:
        answers = await asyncio.gather(*(c.post(url + "/v1/tokenize", content=b, headers={
            "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}) for b in bodies), return_exceptions=True)
    wall = time.perf_counter() - t0
    await asyncio.sleep(3)
    stop.set()
    sampler.join()
    codes: dict = {}
    for a in answers:
        k = a.status_code if isinstance(a, httpx.Response) else type(a).__name__
        codes[k] = codes.get(k, 0) + 1
    return {"images": len(bodies), "bytes_each": int(np.mean([len(b) for b in bodies])), "statuses": codes,
            "wall_s": round(wall, 2), "rss_before_mb": round(before / 2**20, 1), "rss_peak_mb": round(peak / 2**20, 1),
            "rss_rise_mb": round((peak - before) / 2**20, 1), "rss_3s_after_mb": round(rss(pid) / 2**20, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="weights (default: the shipped model)")
    p.add_argument("--threads", type=int, default=1, help="ALIT_TORCH_THREADS of the server")
    p.add_argument("--seconds", type=int, default=15, help="per hit / miss measurement")
    p.add_argument("--clients", type=int, nargs="+", default=[8, 16])
    p.add_argument("--skip", nargs="*", default=[], choices=["hits", "misses", "burst"])
    p.add_argument("--env", nargs="*", default=[], help="extra ALIT_*=VALUE settings for the server")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if shutil.which("ab") is None:
        sys.exit("ApacheBench (ab) is needed: apt-get install apache2-utils (make bench-http does it)")
    extra = dict(e.split("=", 1) for e in args.env)
    report = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_before": os.getloadavg()},
              "server": {"torch_threads": args.threads, **extra}, "seconds": args.seconds}
    print("preparing images ...", flush=True)
    small = encode(base((64, 64)), "PNG")
    big = base((4000, 3000))
    fields = {"max_l1": "0.3"}
    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        url, procs = start(tmp, args.model, args.threads, extra)
        try:
            images = {"png_64px": (small, "a.png"), "jpeg_12mp": (encode(big, "JPEG", quality=90), "a.jpg")}
            report["images"] = {k: len(v[0]) for k, v in images.items()}
            if "hits" not in args.skip:
                report["hits"] = {}
                for name, (data, fname) in images.items():
                    body = tmp / f"{name}.body"
                    body.write_bytes(multipart(data, fname, fields))
                    first = httpx.post(url + "/v1/tokenize", files={"file": (fname, data)}, data=fields, timeout=120)
                    assert first.status_code == 200, first.text
                    for n in args.clients:
                        r = ab(url, body, n, args.seconds)
                        r["load"] = os.getloadavg()[0]
                        report["hits"][f"{name}@{n}"] = r
                        print(f"hits   {name:10s} c={n:2d}: {r['req_per_s']:8.1f} req/s  p50 {r['p50_ms']} ms  "
                              f"p99 {r['p99_ms']} ms  failed {r['failed']} non-2xx {r['non_2xx']}", flush=True)
            if "misses" not in args.skip:
                report["misses"] = {}
                seq = 0
                for name in images:
                    for n in args.clients:
                        count = 400 if name == "png_64px" else 60
                        if name == "png_64px":
                            arr = base((64, 64))
                            bodies = [multipart(encode(variant(arr, seq + i), "PNG"), "a.png", fields) for i in range(count)]
                        else:
                            bodies = [multipart(encode(variant(big, seq + i), "JPEG", quality=90), "a.jpg", fields)
                                      for i in range(count)]
                        seq += count
                        r = asyncio.run(misses(url, bodies, n, args.seconds))
                        r["load"] = os.getloadavg()[0]
                        report["misses"][f"{name}@{n}"] = r
                        print(f"misses {name:10s} c={n:2d}: {r['req_per_s']:8.1f} req/s  p50 {r['p50_ms']} ms  "
                              f"p99 {r['p99_ms']} ms  {r['statuses']}", flush=True)
            if "burst" not in args.skip:
                huge = base((7000, 5000))
                bodies = [multipart(encode(variant(huge, 200 + i), "JPEG", quality=25), "a.jpg", {"tokens": "32"})
                          for i in range(32)]
                del huge
                r = asyncio.run(burst(url, procs[0].pid, bodies))
                report["burst"] = r
                print(f"burst  32 x 7000x5000 JPEG ({r['bytes_each'] / 1e6:.2f} MB each): {r['statuses']}, RSS "
                      f"{r['rss_before_mb']} -> peak {r['rss_peak_mb']} MB (+{r['rss_rise_mb']}), "
                      f"{r['rss_3s_after_mb']} MB 3 s later", flush=True)
        finally:
            for proc in procs:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    report["machine"]["load_after"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
