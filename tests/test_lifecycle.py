"""Start-up and shutdown as a kubelet sees them: the port opens at once, `/readyz` says `starting`
until the model is loaded and warm, missing weights stop start-up, and shutdown is bounded."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import httpx
from conftest import CLI, FIXTURE, ROOT, SLOW_MODEL, free_port


def slow_env(**extra) -> dict:
    return {"PYTHONPATH": f"{SLOW_MODEL}{os.pathsep}{ROOT}", **extra}


def test_readyz_says_starting_until_the_model_is_warm(start_server, tmp_path):
    gate = tmp_path / "load-gate"  # the model load blocks until this file exists
    srv = start_server(wait="/healthz", env=slow_env(ALIT_TEST_LOAD_GATE=str(gate)))
    seen = []
    for _ in range(5):  # the port is open and the process alive while the model is not loaded
        assert httpx.get(srv.url + "/healthz", timeout=30).status_code == 200
        r = httpx.get(srv.url + "/readyz", timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "starting", r.text
        seen.append(r.json()["error"]["code"])
        time.sleep(0.1)
    r = httpx.post(srv.url + "/v1/tokenize", json={"images": []})
    assert r.status_code == 503 and r.json()["error"]["code"] == "starting" and "Retry-After" in r.headers
    assert httpx.get(srv.url + "/v1/models", timeout=30).status_code == 503
    m = httpx.get(srv.url + "/metrics", timeout=30)  # scrapes succeed while loading: process series only
    assert m.status_code == 200 and "process_resident_memory_bytes" in m.text and "alit_" not in m.text, m.text[:500]
    gate.touch()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        r = httpx.get(srv.url + "/readyz", timeout=30)
        if r.status_code == 200:
            break
        assert r.json()["error"]["code"] == "starting", r.text
        time.sleep(0.1)
    assert r.status_code == 200 and r.json()["status"] == "ready", r.text
    assert seen == ["starting"] * 5
    assert httpx.get(srv.url + "/v1/models", timeout=30).status_code == 200
    assert "alit_active_images" in httpx.get(srv.url + "/metrics", timeout=30).text


def _serve(tmp_path, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(ROOT), "ALIT_PORT": str(free_port()), "ALIT_DEVICES": "cpu", **env}
    return subprocess.run([*CLI, "serve"], cwd=tmp_path, env=full, capture_output=True, text=True, timeout=120)


def test_missing_weights_stop_startup_naming_what_was_tried(tmp_path):
    missing = tmp_path / "no-such-model"
    out = _serve(tmp_path, ALIT_MODEL=str(missing))
    assert out.returncode != 0
    assert "model weights not found" in out.stderr and str(missing) in out.stderr, out.stderr[-2000:]
    assert "preset:" in out.stderr  # says how to ask for random weights
    empty = tmp_path / "empty"
    empty.mkdir()
    out = _serve(tmp_path, ALIT_MODEL=str(empty))
    assert out.returncode != 0 and "without a .safetensors, .pth or .bin file" in out.stderr, out.stderr[-2000:]


def test_a_load_that_fails_in_the_background_exits_nonzero(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"not a safetensors file")
    out = _serve(tmp_path, ALIT_MODEL=str(bad))
    assert out.returncode == 1 and "start-up failed" in out.stderr, out.stderr[-2000:]


def test_shutdown_is_bounded_by_drain_plus_ten_seconds(start_server):
    # every iteration takes 2 s more, so a 256-token request outlives the 1 s drain by far
    srv = start_server(drain_seconds=1, env=slow_env(ALIT_TEST_STEP_DELAY_S="2"))
    png = sorted((FIXTURE / "images").rglob("*.png"))[0].read_bytes()
    result = {}

    def request():
        try:
            result["status"] = httpx.post(srv.url + "/v1/tokenize", files={"file": ("a.png", png)},
                                          data={"tokens": "256"}, timeout=60).status_code
        except httpx.HTTPError as e:
            result["status"] = type(e).__name__

    t = threading.Thread(target=request)
    t.start()
    deadline = time.monotonic() + 20
    while srv.metric("alit_active_images") < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert srv.metric("alit_active_images") >= 1, "the request never reached the engine"
    started = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    srv.proc.wait(timeout=30)
    elapsed = time.monotonic() - started
    t.join(timeout=30)
    print(f"SIGTERM -> exit: {elapsed:.1f}s (ALIT_DRAIN_SECONDS=1, bound 11s), request: {result['status']}")
    assert elapsed <= 1 + 10 + 1.5, f"exit took {elapsed:.1f}s, bound is ALIT_DRAIN_SECONDS + 10 = 11s"
    assert result["status"] == 503  # it could not finish: answered `draining` at the drain timeout, not cut off


def test_liveness_fails_once_a_worker_thread_died(start_server):
    srv = start_server(env=slow_env(ALIT_TEST_WORKER_EXIT="1"))
    assert httpx.get(srv.url + "/healthz", timeout=30).status_code == 200
    png = sorted((FIXTURE / "images").rglob("*.png"))[0].read_bytes()
    # its first step ends the worker thread: the request is answered at once, not left to its deadline
    r = httpx.post(srv.url + "/v1/tokenize", files={"file": ("a.png", png)}, timeout=10)
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable", r.text
    assert "died" in r.json()["error"]["message"]
    later = httpx.post(srv.url + "/v1/tokenize", files={"file": ("b.png", png)}, data={"tokens": "64"}, timeout=10)
    assert later.status_code == 503 and later.json()["error"]["code"] == "engine_unavailable", later.text
    deadline = time.monotonic() + 20
    while httpx.get(srv.url + "/healthz", timeout=30).status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    r = httpx.get(srv.url + "/healthz", timeout=30)
    assert r.status_code == 503 and "died" in r.json()["error"]["message"], r.text
    assert httpx.get(srv.url + "/readyz", timeout=30).status_code == 503


def test_no_request_outlives_its_deadline_even_inside_a_long_step(start_server):
    # every iteration takes 5 s more: the engine only sees the deadline at its next step, 5 s later;
    # the API answers 504 one second after the deadline whatever the engine is doing
    srv = start_server(warmup="false", env=slow_env(ALIT_TEST_STEP_DELAY_S="5"))
    png = sorted((FIXTURE / "images").rglob("*.png"))[0].read_bytes()
    t = time.monotonic()
    r = httpx.post(srv.url + "/v1/tokenize", files={"file": ("a.png", png)}, data={"tokens": "64"},
                   headers={"X-Request-Timeout": "0.5"}, timeout=30)
    elapsed = time.monotonic() - t
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded", r.text
    assert elapsed < 3.5, f"answered after {elapsed:.1f}s; the deadline was 0.5 s"
    log = srv.log.read_text()
    assert "no answer by the request's deadline" in log
    assert "exception was never retrieved" not in log  # the cancelled work ends quietly
