"""What ships is what is tested: Dockerfiles (hadolint), one pinned dependency set, compose, the
Kubernetes manifests (rendered and strictly validated offline), and a wheel that serves the default model.

No Docker engine or Kubernetes cluster runs here: images are linted, not built; manifests are
validated against the Kubernetes schemas, not applied.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import ROOT, free_port, wait_http

BIN = Path(sys.executable).parent
DOCKERFILES = [ROOT / "Dockerfile", ROOT / "deploy" / "triton-image" / "Dockerfile"]
OVERLAYS = ("cpu", "gpu", "triton")


# ----- images ---------------------------------------------------------------------------------------


def test_every_dockerfile_is_listed_and_hadolint_clean():
    found = {p for p in ROOT.rglob("Dockerfile*") if not {".venv", "node_modules", ".git"} & set(p.parts)}
    assert found == set(DOCKERFILES), found  # a new Dockerfile joins the list (and `make hadolint`)
    out = subprocess.run([BIN / "hadolint", *map(str, DOCKERFILES)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "", out.stdout + out.stderr


def test_hadolint_reports_findings():  # the linter really lints (a clean run is not a silent no-op)
    bad = "FROM python:latest\nRUN apt-get install curl\n"
    out = subprocess.run([BIN / "hadolint", "-"], input=bad, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "DL3007" in out.stdout and "DL3008" in out.stdout, out.stdout


def pins() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return dict(line.split("==", 1) for line in lines if line and not line.startswith("#"))


def test_one_pinned_dependency_set_for_tests_and_images():
    import importlib.metadata as md

    import torch

    pinned = pins()
    assert torch.__version__.split("+")[0] == pinned["torch"]  # the tests run the images' torch version
    assert torch.version.cuda is None  # and the CPU build of it, never a CUDA build
    for dist in ("fastapi", "numpy", "redis", "tritonclient", "pydantic", "safetensors", "uvicorn"):
        assert md.version(dist) == pinned[dist], dist  # what the tests import is what the images pin
    makefile = (ROOT / "Makefile").read_text()
    assert '-c $(CONSTRAINTS) -e ".[test]"' in makefile and "CONSTRAINTS := constraints.txt" in makefile
    for df in DOCKERFILES:
        text = df.read_text()
        installs = re.findall(r"pip install [^\n]*", text.replace("\\\n", " "))
        assert installs and all("-c constraints.txt" in i for i in installs), (df, installs)
        assert "COPY constraints.txt" in text and "download.pytorch.org/whl/${TORCH_VARIANT}" in text
        assert "ARG TORCH_VARIANT=cu130" in text  # the GPU build: CUDA 13.0
    api = DOCKERFILES[0].read_text()
    assert 'pip install -c constraints.txt ".[triton]"' in api  # ALIT_ENGINE=triton works in the image
    assert "\nUSER 10001" in api and "HEALTHCHECK" in api and api.count("FROM ") == 2
    triton = DOCKERFILES[1].read_text()
    assert re.search(r"TRITON_IMAGE=nvcr\.io/nvidia/tritonserver:\d\d\.\d\d-py3", triton)
    assert "COPY model_repository /models_repo" in triton and "kind: KIND_GPU" in triton


def test_triton_extra_is_what_the_engine_imports():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(d.startswith("tritonclient[grpc]") for d in project["optional-dependencies"]["triton"])
    remote = (ROOT / "service" / "engine" / "triton_client.py").read_text()
    assert "tritonclient" in remote


# ----- compose ----------------------------------------------------------------------------------------


def compose_config(*files: str, profile: bool = True) -> dict:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("DOCKER-COMPOSE NOT INSTALLED: `make test` installs Debian's docker-compose when it can")
    args = [binary] + sum((["-f", f] for f in files), []) + (["--profile", "triton"] if profile else []) + ["config"]
    out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)


def test_compose_health_checks_and_variants():
    for name in ("docker-compose.yml", "docker-compose.gpu.yml"):
        assert "version" not in yaml.safe_load((ROOT / name).read_text()), name  # obsolete key
    cpu = compose_config("docker-compose.yml")["services"]
    assert set(cpu) == {"api", "redis", "prometheus", "grafana", "triton"}
    for name in ("redis", "prometheus", "grafana"):
        assert cpu[name]["healthcheck"]["test"][0] == "CMD", name
    assert cpu["api"]["depends_on"] == {"redis": {"condition": "service_healthy"}}
    assert cpu["grafana"]["depends_on"] == {"prometheus": {"condition": "service_healthy"}}
    assert cpu["api"]["build"]["args"]["TORCH_VARIANT"] == "cpu"  # CPU path: no CUDA image
    assert cpu["triton"]["shm_size"] and cpu["triton"]["build"]["dockerfile"] == "deploy/triton-image/Dockerfile"
    assert _seconds(cpu["api"]["stop_grace_period"]) > 30 + 10  # > ALIT_DRAIN_SECONDS + 10
    assert int(cpu["api"]["environment"]["ALIT_DRAIN_SECONDS"]) == 30
    gpu = compose_config("docker-compose.yml", "docker-compose.gpu.yml")["services"]
    assert gpu["api"]["build"]["args"]["TORCH_VARIANT"] == "cu130"
    assert gpu["api"]["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"


def _seconds(value) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    m = re.fullmatch(r"(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?", str(value))
    return int(m.group(1) or 0) * 60 + float(m.group(2) or 0)


# ----- Kubernetes -------------------------------------------------------------------------------------


def render(overlay: str) -> list[dict]:
    out = subprocess.run(["make", "-s", "k8s", f"K8S_OVERLAY={overlay}", f"VENV={BIN.parent}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout, [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_renders_offline_and_passes_strict_validation(overlay, tmp_path):
    text, docs = render(overlay)
    path = tmp_path / f"{overlay}.yaml"
    path.write_text(text)
    out = subprocess.run([BIN / "kubernetes-validate", "--strict", "--quiet", str(path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for want in [("Deployment", "alit-api"), ("Service", "alit-api"), ("PodDisruptionBudget", "alit-api"),
                 ("HorizontalPodAutoscaler", "alit-api"), ("ConfigMap", "alit-serve-config"),
                 ("Secret", "alit-serve-api-keys"), ("Deployment", "alit-redis"), ("Service", "alit-redis"),
                 ("ConfigMap", "alit-prometheus-adapter-rules")]:
        assert want in kinds, (overlay, want)
    by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    pod = by["Deployment", "alit-api"]["spec"]["template"]
    api = pod["spec"]["containers"][0]
    assert {"startupProbe", "readinessProbe", "livenessProbe"} <= set(api)
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    config = by["ConfigMap", "alit-serve-config"]["data"]
    bound = float(config["ALIT_DRAIN_SECONDS"]) + 10  # service/api/server.py: shutdown_bound
    pre_stop = api["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["spec"]["terminationGracePeriodSeconds"] > pre_stop + bound
    assert pod["spec"]["securityContext"]["runAsNonRoot"] and api["securityContext"]["readOnlyRootFilesystem"]
    assert api["resources"]["requests"] and pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    metrics = by["HorizontalPodAutoscaler", "alit-api"]["spec"]["metrics"]
    assert metrics[0]["pods"]["metric"]["name"] == "alit_queue_depth" and len(metrics) == 2
    assert "alit_queue_depth" in by["ConfigMap", "alit-prometheus-adapter-rules"]["data"]["config.yaml"]
    gpus = api["resources"].get("limits", {}).get("nvidia.com/gpu")
    assert gpus == (1 if overlay == "gpu" else None)
    if overlay == "triton":
        triton = by["Deployment", "alit-triton"]["spec"]["template"]["spec"]
        assert triton["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert any(v.get("emptyDir", {}).get("medium") == "Memory" for v in triton["volumes"])
        assert config["ALIT_ENGINE"] == "triton" and ("Service", "alit-triton") in kinds


def test_strict_validation_rejects_an_unknown_field(tmp_path):
    text, _ = render("cpu")
    broken = tmp_path / "broken.yaml"
    broken.write_text(text.replace("terminationGracePeriodSeconds:", "terminationGracePeriodSecond:"))
    out = subprocess.run([BIN / "kubernetes-validate", "--strict", "--quiet", str(broken)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0


# ----- the default model travels with the package ------------------------------------------------------


def test_wheel_from_a_fresh_clone_serves_the_default_model(tmp_path):
    """Build the wheel from the files a clone has, install it into a new venv, run it from elsewhere."""
    from service.model.checkpoint import load_model

    clone = tmp_path / "clone"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for rel in filter(None, tracked.decode().split("\0")):
        if (ROOT / rel).is_file():
            (clone / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, clone / rel)
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist),
                    str(clone)], check=True, capture_output=True, timeout=300)
    (wheel,) = dist.glob("alit_serve-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    vpy = venv / "bin" / "python"
    subprocess.run([vpy, "-m", "pip", "install", "--no-deps", "-q", str(wheel)], check=True, timeout=300)
    # the dependencies (torch & co.) come from the test environment's site-packages, added as a plain
    # path (not as a site dir, so its editable install of this checkout is not picked up)
    site = subprocess.run([vpy, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    ours = [p for p in sys.path if p.endswith("site-packages")][0]
    Path(site, "zz_test_deps.pth").write_text(ours + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("ALIT_MODEL", "PYTHONPATH")}
    located = subprocess.run([vpy, "-c", "import service; print(service.__file__)"], cwd=elsewhere, env=env,
                             capture_output=True, text=True, check=True).stdout.strip()
    assert located.startswith(str(venv)), located  # the package under test is the wheel's, not the checkout
    port = free_port()
    env.update(ALIT_PORT=str(port), ALIT_DEVICES="cpu", ALIT_TORCH_THREADS="1")
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([venv / "bin" / "alit-serve", "serve"], cwd=elsewhere, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", proc, timeout=120, log=log)
        model = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"][0]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    shipped = load_model(ROOT / "service" / "weights")  # what `make serve` serves (ALIT_MODEL unset)
    assert model["id"] == "alit-serve-default" and model["fingerprint"] == shipped.fingerprint
    assert model["source"].startswith(str(venv)) and "preset" not in model["source"]
    # without the packaged weights the installed service refuses to start, naming what it tried
    weights = Path(located).parent / "weights"
    shutil.rmtree(weights)
    out = subprocess.run([venv / "bin" / "alit-serve", "serve"], cwd=elsewhere, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0 and "packaged default model" in out.stderr and str(weights) in out.stderr, out.stderr
