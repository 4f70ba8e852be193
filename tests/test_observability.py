"""Metrics, the Grafana dashboard proven on a real Prometheus, and the deployment files."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import FIXTURE, ROOT, free_port


def _render_dashboard():
    """deploy/render_dashboard.py, loaded by path: deploy/ on sys.path could shadow installed packages
    with its folders (a folder called triton/ once hid the `triton` package torch probes for)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("render_dashboard", ROOT / "deploy" / "render_dashboard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


concrete = _render_dashboard().concrete

DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "alit.json"
PHOTOS = sorted((FIXTURE / "images").rglob("*.*"))


def drive_mixed_traffic(url: str) -> None:
    """Every kind of request the dashboard shows: targets of each kind, hits, reconstructs, errors."""
    for i, p in enumerate(PHOTOS):
        data = p.read_bytes()
        target = [{"max_l1": "0.9"}, {"tokens": "96"}, {"min_psnr": "2"}, {"max_l1": "0.0001", "max_tokens": "128"}][i % 4]
        r = httpx.post(url + "/v1/tokenize", files={"file": ("a.png", data)}, data=target, timeout=60)
        assert r.status_code == 200, r.text
        assert httpx.post(url + "/v1/tokenize", files={"file": ("a.png", data)}, data=target, timeout=60).json()["results"][0]["cached"]
        ids = r.json()["results"][0]["token_ids"]
        assert httpx.post(url + "/v1/reconstruct", json={"token_ids": ids}, timeout=60).status_code == 200
    assert httpx.post(url + "/v1/tokenize", files={"file": ("a.png", b"junk")}).status_code == 415
    assert httpx.post(url + "/v1/reconstruct", json={"token_ids": [1]}).status_code == 422


def start_prometheus(tmp_path, targets: dict[str, int]) -> tuple[subprocess.Popen, str]:
    """A real Prometheus scraping {job name: port on 127.0.0.1} every second."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("PROMETHEUS NOT INSTALLED: `make test` installs Debian's prometheus package when it can "
                    "(apt-get as root); install it to run the dashboard test")
    port = free_port()
    cfg = tmp_path / "prometheus.yml"
    jobs = "".join(f"  - job_name: {job}\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
                   for job, port in targets.items())
    cfg.write_text(f"global:\n  scrape_interval: 1s\nscrape_configs:\n{jobs}")
    proc = subprocess.Popen([binary, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/-/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("prometheus did not become ready")


GPU_ONLY = "alit_gpu_memory_allocated_bytes"  # exported per CUDA worker only


def panel_targets() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]


def test_every_dashboard_query_has_data_on_a_real_prometheus(start_server, tmp_path):
    srv = start_server()
    prom, prom_url = start_prometheus(tmp_path, {"alit-api": srv.port})
    try:
        time.sleep(2.5)  # a few scrapes before the traffic, so rate() has a baseline
        drive_mixed_traffic(srv.url)
        time.sleep(4)  # a few scrapes after it
        up = httpx.get(prom_url + "/api/v1/query", params={"query": "up"}).json()["data"]["result"]
        assert up and up[0]["value"][1] == "1"
        empty, gpu_targets = [], []
        for title, expr in panel_targets():
            q = concrete(expr, rng="5m")
            r = httpx.get(prom_url + "/api/v1/query", params={"query": q}).json()
            assert r["status"] == "success", (title, r)
            if GPU_ONLY in expr:  # this server runs on the CPU: the GPU series must be absent, not zero
                gpu_targets.append(title)
                assert not r["data"]["result"], (title, r["data"]["result"])
            elif not r["data"]["result"]:
                empty.append(title)
        assert not empty, f"panels without data: {empty}"
        assert gpu_targets == ["Memory: process RSS and GPU allocated by torch"]
        # the rendering script works on the same data
        out = tmp_path / "dashboard.png"
        subprocess.run([str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv").exists() else "python",
                        str(ROOT / "deploy" / "render_dashboard.py"), "--prometheus", prom_url, "--minutes", "1",
                        "--out", str(out)], check=True, timeout=120)
        assert out.stat().st_size > 10_000
    finally:
        prom.kill()
        prom.wait()


ENGINE_PANELS = {"Encoder latency p95 per iteration", "Stage time per iteration (mean)",
                 "Step batch size (mean) and step time p95", "Queue wait p95", "Halting iteration distribution",
                 "Tokens per image (mean, by target kind)", "Targets met", "Worker health", "Errors and rejections"}


def test_a_triton_deployment_feeds_the_engine_panels(start_server, triton_ports, tmp_path):
    """ALIT_ENGINE=triton, Prometheus scraping the API and Triton's metrics port (as deploy/ does):
    with the dashboard's job variable on `triton`, the engine panels show Triton's own engine."""
    srv = start_server(engine="triton")
    prom, prom_url = start_prometheus(tmp_path, {"alit-api": srv.port, "triton": triton_ports.metrics})
    try:
        time.sleep(2.5)
        drive_mixed_traffic(srv.url)
        time.sleep(4)
        with_data = set()
        for title, expr in panel_targets():
            if title in ENGINE_PANELS:
                r = httpx.get(prom_url + "/api/v1/query", params={"query": concrete(expr, rng="5m", job="triton")}).json()
                assert r["status"] == "success", (title, r)
                if r["data"]["result"]:
                    with_data.add(title)
        assert with_data == ENGINE_PANELS, f"engine panels without Triton data: {ENGINE_PANELS - with_data}"
        executed = httpx.get(prom_url + "/api/v1/query", params={
            "query": 'sum(nv_inference_exec_count{job="triton"})'}).json()["data"]["result"]
        assert executed and float(executed[0]["value"][1]) > 0
    finally:
        prom.kill()
        prom.wait()


def test_metric_names_and_types_follow_conventions(start_server):
    srv = start_server()
    drive_mixed_traffic(srv.url)
    text = httpx.get(srv.url + "/metrics").text
    types = dict(line.split()[2:4] for line in text.splitlines() if line.startswith("# TYPE"))
    ours = {n: t for n, t in types.items() if n.startswith("alit_")}
    assert len(ours) >= 18
    dimensionless = {"alit_step_batch_size", "alit_halting_iteration", "alit_tokens_per_image"}
    for name, kind in ours.items():
        assert name == name.lower() and "__" not in name
        if kind == "counter":
            assert name.endswith("_total"), name
        else:
            assert not name.endswith("_total"), name
        if kind == "histogram":
            assert name.endswith("_seconds") or name in dimensionless, f"{name}: histogram without a unit"
        if kind == "gauge" and "memory" in name:
            assert name.endswith("_bytes"), name
    for fam in text_string_to_metric_families(text):
        if fam.type == "histogram" and fam.name.endswith("_seconds"):
            bounds = sorted({float(s.labels["le"]) for s in fam.samples if s.name.endswith("_bucket") and s.labels["le"] != "+Inf"})
            assert bounds[0] <= 0.005 and bounds[-1] >= 10, (fam.name, bounds)  # ms-scale steps .. slow requests
        for s in fam.samples:  # bounded label values: no ids, paths or free text
            assert all(len(v) < 80 for k, v in s.labels.items() if k != "fingerprint"), s


# compose files, Dockerfiles: tests/test_deploy.py


def test_grafana_provisioning_points_at_the_dashboard():
    ds = (ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
    prov = (ROOT / "deploy/grafana/provisioning/dashboards/dashboards.yml").read_text()
    dash = json.loads(DASHBOARD.read_text())
    assert "uid: prometheus" in ds and "/var/lib/grafana/dashboards" in prov
    assert all(p["datasource"]["uid"] == "prometheus" for p in dash["panels"])
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for word in ("latency", "iteration", "batch", "queue", "halting", "tokens", "cache", "error", "memory"):
        assert word in titles, word


def test_metrics_have_process_collectors_status_label_and_no_paths(start_server):
    srv = start_server()
    data = (FIXTURE / "images" / "birds" / "000000.png").read_bytes()
    assert httpx.post(srv.url + "/v1/tokenize", files={"file": ("a.png", data)}, data={"tokens": "32"}, timeout=60).status_code == 200
    assert httpx.post(srv.url + "/v1/tokenize", files={"file": ("a.png", b"junk")}).status_code == 415
    text = httpx.get(srv.url + "/metrics").text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("process_cpu_seconds", "process_resident_memory_bytes", "python_info", "python_gc_collections"):
        assert name in fams, name
    assert srv.metric("process_cpu_seconds_total") > 0
    statuses = {s.labels["status"] for s in fams["alit_request_duration_seconds"].samples
                if s.labels.get("endpoint") == "/v1/tokenize"}
    assert {"200", "415"} <= statuses, statuses
    assert "alit_device_memory_bytes" not in text  # replaced by RSS + alit_gpu_memory_allocated_bytes
    assert "alit_gpu_memory_allocated_bytes{" not in text  # CPU only here: no GPU series
    for fam in fams.values():
        for s in fam.samples:
            for v in s.labels.values():
                assert "/" not in v or v.startswith("/") and v in ENDPOINT_LABELS, (s.name, s.labels)


ENDPOINT_LABELS = {"/v1/tokenize", "/v1/reconstruct", "/tokenize", "/reconstruct", "/v1/models", "/healthz", "/readyz",
                   "/metrics", "/", "/openapi.json", "/docs"}


def test_metric_definitions_are_one_table_without_prometheus_client():
    """service/metric_defs.py is plain data (Triton's Python-backend stub has no prometheus-client)."""
    import subprocess
    import sys

    code = ("import sys, builtins; real = builtins.__import__\n"
            "def imp(name, *a, **k):\n"
            "    if name.startswith('prometheus_client'): raise ImportError('no prometheus_client here')\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = imp\n"
            "from service.metric_defs import engine_metrics, service_metrics\n"
            "print(len(engine_metrics()), len(service_metrics()))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    triton = (ROOT / "model_repository" / "alit" / "1" / "triton_metrics.py").read_text()
    assert "engine_metrics(" in triton and '"alit_' not in triton  # no metric name written twice
