"""Single-flight across replicas: two API processes on one real Redis compute an image once, and a
replica whose leader dies mid-computation takes over once the leader's lease expires."""

from __future__ import annotations

import io
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import redis
from conftest import ROOT, SLOW_MODEL
from PIL import Image

LEASE_S = 2.0


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def two_replicas(start_server, shared_redis_url, cache_prefix, delay_s: str):
    env = {"PYTHONPATH": f"{SLOW_MODEL}{os.pathsep}{ROOT}", "ALIT_TEST_STEP_DELAY_S": delay_s}
    settings = {"redis_url": shared_redis_url, "cache_prefix": cache_prefix, "cache_lease_s": LEASE_S,
                "warmup": "false"}
    servers = start_server(env=env, **settings), start_server(env=env, **settings)
    # Open each process's Redis connections before the measured requests: on a loaded machine a first
    # connect can exceed the cache's 0.25 s timeout, and Redis "down" rightly means per-process only.
    with ThreadPoolExecutor(20) as pool:
        list(pool.map(lambda i: tokenize(servers[i % 2].url, png(100 + i), tokens="32"), range(20)))
    time.sleep(1.0)  # past the cache's retry backoff, should a warm-up connect have timed out
    return servers


def tokenize(url: str, image: bytes, tokens: str = "256") -> httpx.Response:
    return httpx.post(url + "/v1/tokenize", files={"file": ("i.png", image)}, data={"tokens": tokens}, timeout=60)


def count(servers, name: str, **labels) -> float:
    return sum(s.metric(name, **labels) for s in servers)


def test_twenty_identical_requests_over_two_replicas_compute_once(start_server, shared_redis_url, cache_prefix):
    a, b = two_replicas(start_server, shared_redis_url, cache_prefix, delay_s="0.1")
    image = png(1)
    misses0, hits0 = (count((a, b), "alit_cache_requests_total", result=r) for r in ("miss", "hit"))
    images0 = count((a, b), "alit_images_total")
    with ThreadPoolExecutor(20) as pool:
        replies = list(pool.map(lambda i: tokenize((a, b)[i % 2].url, image), range(20)))
    assert [r.status_code for r in replies] == [200] * 20, [r.text for r in replies if r.status_code != 200]
    ids = {tuple(r.json()["results"][0]["token_ids"]) for r in replies}
    assert len(ids) == 1 and len(next(iter(ids))) == 256
    misses = count((a, b), "alit_cache_requests_total", result="miss") - misses0
    hits = count((a, b), "alit_cache_requests_total", result="hit") - hits0
    assert misses == 1 and hits == 19, (misses, hits)  # one computation; 19 answered from it
    assert count((a, b), "alit_images_total") - images0 == 1  # the engines ran one image


def test_a_replica_takes_over_when_the_leader_dies(start_server, shared_redis_url, cache_prefix):
    a, b = two_replicas(start_server, shared_redis_url, cache_prefix, delay_s="0.5")  # ~4 s per image
    image = png(2)
    b_misses0 = count((b,), "alit_cache_requests_total", result="miss")
    client = redis.Redis.from_url(shared_redis_url)
    with ThreadPoolExecutor(20) as pool:
        first = pool.submit(tokenize, a.url, image)  # a leads: it takes the lease and computes
        for _ in range(100):
            if list(client.scan_iter(match=cache_prefix + "lease:*")):
                break
            time.sleep(0.05)
        assert list(client.scan_iter(match=cache_prefix + "lease:*")), "the leader never took a lease"
        on_a = [pool.submit(tokenize, a.url, image) for _ in range(9)]
        on_b = [pool.submit(tokenize, b.url, image) for _ in range(10)]
        time.sleep(0.5)  # b's requests are waiting on a's lease
        a.proc.send_signal(signal.SIGKILL)  # the leader dies mid-computation
        a.proc.wait(timeout=10)
        killed = time.monotonic()
        answered = []
        for fut in [first, *on_a]:  # a's clients see the connection drop; a load balancer retries on b
            try:
                answered.append(fut.result(timeout=60))
            except httpx.HTTPError:
                answered.append(tokenize(b.url, image))
        answered += [f.result(timeout=60) for f in on_b]
        print(f"leader killed -> b's 10 waiters answered after {time.monotonic() - killed:.1f}s (lease TTL {LEASE_S}s)")
    assert [r.status_code for r in answered] == [200] * 20, [r.text for r in answered if r.status_code != 200]
    assert len({tuple(r.json()["results"][0]["token_ids"]) for r in answered}) == 1
    # b computed once, after a's lease expired, for all of its waiters
    assert count((b,), "alit_cache_requests_total", result="miss") - b_misses0 == 1
