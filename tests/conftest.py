from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "alit-reference"
CLI = [sys.executable, "-m", "service.cli"]

torch.set_num_threads(int(os.environ.get("ALIT_TEST_THREADS", min(2, torch.get_num_threads()))))


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    return FIXTURE


@pytest.fixture(scope="session")
def expected() -> dict[str, np.ndarray]:
    with np.load(FIXTURE / "expected.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="session")
def ref_model():
    from service.model.checkpoint import load_model

    return load_model(FIXTURE / "checkpoint.pth").model


@pytest.fixture(scope="session")
def images(expected) -> torch.Tensor:
    return torch.from_numpy(expected["input"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stdout.read() if proc.stdout else ''}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer 200 within {timeout}s")


def run_cli(*args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300, **kw)
