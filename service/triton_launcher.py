"""Start a local Triton Inference Server (the binary the nvidia-pytriton wheel ships) on our model
repository: `alit-serve triton` / `make triton`. For development and tests; production runs NVIDIA's
Triton container on `model_repository/`.

The repository is used in place (never copied): its models `alit`, `karl` and `titok` share one code
folder (`karl/1` and `titok/1` are relative links to `alit/1`), and each picks its weights by its name
(`ALIT_MODELS`, see model_repository/alit/1/model.py). Triton loads only the models served
(`load_flags`): the ids of `ALIT_MODELS`, else `alit` alone — not an idle copy of the default weights
under every other name.

The wheel's tree is assembled into a runtime folder (the Python backend needs the stub built for
this Python next to it), its bundled libraries go on LD_LIBRARY_PATH, and ALIT_PYTHONPATH tells the
model's `model.py` where this environment's packages and the project are (the stub ignores
PYTHONPATH).
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPOSITORY = ROOT / "model_repository"


class TritonUnavailable(RuntimeError):
    pass


def _pytriton_paths() -> tuple[Path, Path]:
    try:
        import pytriton
    except ImportError as e:
        raise TritonUnavailable("nvidia-pytriton is not installed (pip install nvidia-pytriton)") from e
    pkg = Path(pytriton.__file__).parent
    libs = pkg.parent / "nvidia_pytriton.libs"
    return pkg / "tritonserver", libs


def prepare_runtime(runtime: Path) -> Path:
    """A tritonserver tree with the Python-backend stub for this interpreter; returns its folder."""
    server, _ = _pytriton_paths()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = server / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonUnavailable(f"no Python-backend stub for Python {version} in {server}")
    if not (runtime / "bin" / "tritonserver").is_file():
        runtime.mkdir(parents=True, exist_ok=True)
        shutil.copytree(server, runtime, dirs_exist_ok=True, ignore=shutil.ignore_patterns("python_backend_stubs"))
    target = runtime / "backends" / "python" / "triton_python_backend_stub"
    if not target.is_file():
        shutil.copy(stub, target)
    return runtime


@dataclass
class TritonPorts:
    http: int = 8010
    grpc: int = 8011
    metrics: int = 8012


def load_flags(repository: Path, env: dict) -> list[str]:
    """Triton's flags to load just the served models: each id of `ALIT_MODELS` (the front asks the
    Triton model of its id), else `alit` (the front's single model). TritonUnavailable when an id
    has no folder in the repository."""
    from .settings import Settings

    try:
        ids = [name or "alit" for name, _ in Settings(models=env.get("ALIT_MODELS", "")).model_specs()]
    except ValueError as e:
        raise TritonUnavailable(str(e)) from e
    missing = [i for i in ids if not (repository / i / "config.pbtxt").is_file()]
    if missing:
        raise TritonUnavailable(f"ALIT_MODELS names {', '.join(map(repr, missing))}, which {repository} has "
                                "no folder for (add one as karl/ is: a link 1 -> ../alit/1 and config.pbtxt "
                                "with the name)")
    return ["--model-control-mode=explicit", *(f"--load-model={i}" for i in ids)]


def command(runtime: Path, ports: TritonPorts, repository: Path = REPOSITORY, exit_timeout: int = 30,
            extra_env: dict | None = None) -> tuple[list[str], dict]:
    """The tritonserver command line and environment (this one's, plus extra_env, e.g. ALIT_MODEL)."""
    _, libs = _pytriton_paths()
    env = {**os.environ, **(extra_env or {})}
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(libs), env.get("LD_LIBRARY_PATH", "")) if p)
    paths = [str(ROOT), *site.getsitepackages()]
    env["ALIT_PYTHONPATH"] = os.pathsep.join(paths)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    cmd = [str(runtime / "bin" / "tritonserver"), f"--model-repository={repository}",
           f"--backend-directory={runtime / 'backends'}", f"--http-port={ports.http}", f"--grpc-port={ports.grpc}",
           f"--metrics-port={ports.metrics}", "--log-verbose=0", f"--exit-timeout-secs={exit_timeout}",
           *load_flags(repository, env)]
    return cmd, env


def start(runtime: Path, ports: TritonPorts, repository: Path = REPOSITORY, exit_timeout: int = 30,
          extra_env: dict | None = None, **popen) -> subprocess.Popen:
    cmd, env = command(prepare_runtime(runtime), ports, repository, exit_timeout, extra_env)
    return subprocess.Popen(cmd, env=env, **popen)


def start_ready(runtime: Path, ports: TritonPorts, log: Path, extra_env: dict | None = None, model: str = "alit",
                timeout: float = 180.0, exit_timeout: int = 5, models: tuple[str, ...] = ()) -> subprocess.Popen:
    """Start a tritonserver (output to `log`) and return once `model` (or every one of `models`) is
    ready; raise with the log's tail if it exits or does not get there in `timeout` seconds. For tests
    and benchmarks."""
    import time
    import urllib.error
    import urllib.request

    with open(log, "w") as out:
        proc = start(runtime, ports, exit_timeout=exit_timeout, extra_env=extra_env, stdout=out,
                     stderr=subprocess.STDOUT)
    waiting = list(models or (model,))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"tritonserver exited with {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{ports.http}/v2/models/{waiting[0]}/ready",
                                        timeout=1) as r:
                if r.status == 200:
                    waiting.pop(0)
                    if not waiting:
                        return proc
                    continue
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    proc.kill()
    proc.wait()
    raise TimeoutError(f"tritonserver: {', '.join(waiting)} not ready after {timeout:.0f} s: "
                       f"{log.read_text()[-3000:]}")


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="alit-serve triton", description=__doc__)
    p.add_argument("--runtime", default=str(ROOT / "runs" / "tritonserver"), help="folder for the server tree")
    p.add_argument("--http-port", type=int, default=8010)
    p.add_argument("--grpc-port", type=int, default=8011)
    p.add_argument("--metrics-port", type=int, default=8012)
    p.add_argument("--repository", default=str(REPOSITORY))
    p.add_argument("--load-flags", action="store_true",
                   help="only print the flags that load the served models (for a tritonserver started elsewhere)")
    a = p.parse_args(argv)
    try:
        if a.load_flags:
            print(" ".join(load_flags(Path(a.repository), dict(os.environ))))
            return 0
        cmd, env = command(prepare_runtime(Path(a.runtime)), TritonPorts(a.http_port, a.grpc_port, a.metrics_port),
                           Path(a.repository))
    except TritonUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.execvpe(cmd[0], cmd, env)
    return 0
