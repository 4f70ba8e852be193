"""`alit-serve serve` runs uvicorn on the built-in default model and answers over real HTTP."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx

from conftest import ROOT, free_port, wait_http


def test_serve_answers_healthz_readyz_and_models():
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ALIT_PORT": str(port)}
    env.pop("ALIT_MODEL", None)
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc)
        assert httpx.get(f"http://127.0.0.1:{port}/readyz").json()["status"] == "ready"
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"]
        from service.settings import DEFAULT_MODEL

        shipped = not DEFAULT_MODEL.startswith("preset:")
        assert models[0]["id"] == ("alit-serve-default" if shipped else "test_tiny")
        assert models[0]["max_tokens"] == 256 and len(models[0]["fingerprint"]) == 64
    finally:
        proc.terminate()
        proc.wait(timeout=30)
