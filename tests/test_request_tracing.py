"""Following one request: its X-Request-ID, its JSON log lines and its OpenTelemetry spans.

Through real uvicorn (`alit-serve serve`), except the span-tree test, which runs the app in-process
to read spans from an in-memory exporter.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

from conftest import FIXTURE

PHOTO = FIXTURE / "images" / "birds" / "000000.png"
TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT = "b7ad6b7169203331"


def json_objects(text: str) -> list[dict]:
    """Every JSON object in a log: one-line log records and the console exporter's indented spans."""
    dec, out, i = json.JSONDecoder(), [], 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        obj, i = dec.raw_decode(text, i)  # raises on anything that is not JSON
        out.append(obj)
    return out


def test_request_id_is_echoed_and_on_every_json_log_line(start_server):
    srv = start_server(log_format="json", log_level="debug", api_keys="secret-key-1")
    auth = {"Authorization": "Bearer secret-key-1"}
    r = httpx.post(srv.url + "/v1/tokenize", files={"file": ("a.png", PHOTO.read_bytes())}, data={"tokens": "64"},
                   headers={**auth, "X-Request-ID": "abc"}, timeout=60)
    assert r.status_code == 200 and r.headers["x-request-id"] == "abc"
    ids = r.json()["results"][0]["token_ids"]
    # errors carry it too, in the header and the body
    bad = httpx.post(srv.url + "/v1/tokenize", files={"file": ("a.png", b"junk")}, headers={**auth, "X-Request-ID": "req-2"})
    assert bad.status_code == 415 and bad.headers["x-request-id"] == "req-2"
    assert bad.json()["error"]["request_id"] == "req-2"
    unauth = httpx.get(srv.url + "/v1/models", headers={"X-Request-ID": "req-3"})
    assert unauth.status_code == 401 and unauth.json()["error"]["request_id"] == "req-3"
    # an ID that is too long or has odd characters is replaced, not echoed
    for given in ("x" * 129, "a b", "é"):
        got = httpx.get(srv.url + "/healthz", headers={"X-Request-ID": given.encode()}).headers["x-request-id"]
        assert got != given and len(got) == 32
    srv.stop()
    records = [json.loads(line) for line in srv.log.read_text().splitlines() if line.strip()]  # every line is JSON
    for rec in records:
        assert {"time", "level", "logger", "message", "request_id"} <= rec.keys(), rec
    mine = [rec for rec in records if rec["request_id"] == "abc"]
    assert {"alit.access", "alit.pipeline"} <= {rec["logger"] for rec in mine}, mine
    access = next(rec for rec in mine if rec["logger"] == "alit.access")
    assert access["method"] == "POST" and access["path"] == "/v1/tokenize" and access["status"] == 200
    assert access["duration_ms"] > 0
    assert any(rec["logger"].startswith("uvicorn") for rec in records)  # uvicorn's own lines, same format
    text = srv.log.read_text()
    assert "secret-key-1" not in text and json.dumps(ids[:8])[1:-1] not in text


def test_console_traces_join_the_callers_trace(start_server, monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")
    srv = start_server(log_format="json")
    r = httpx.post(srv.url + "/v1/tokenize", files={"file": ("a.png", PHOTO.read_bytes())},
                   data={"max_l1": "0.0001", "max_tokens": "128"},
                   headers={"traceparent": f"00-{TRACE}-{PARENT}-01", "X-Request-ID": "traced-1"}, timeout=60)
    assert r.status_code == 200, r.text
    srv.stop()
    spans = [o for o in json_objects(srv.log.read_text()) if "context" in o]
    ours = [s for s in spans if s["context"]["trace_id"] == "0x" + TRACE]
    names = {s["name"] for s in ours}
    assert {"image decode", "cache lookup", "engine", "queue wait", "compute", "cache merge"} <= names, names
    server = [s for s in ours if s["parent_id"] == "0x" + PARENT]
    assert len(server) == 1 and server[0]["kind"] == "SpanKind.SERVER"
    compute = next(s for s in ours if s["name"] == "compute")
    events = [e for e in compute["events"] if e["name"] == "iteration"]
    assert [e["attributes"]["alit.tokens"] for e in events] == [32, 64, 96, 128]
    assert all("alit.l1" in e["attributes"] for e in events)  # a quality target measures every iteration
    assert all(s["attributes"].get("alit.request_id") == "traced-1" for s in ours)


def test_in_memory_span_tree(tmp_path):
    """The app in-process with an in-memory exporter: the span tree of a miss and of a hit."""
    from fastapi.testclient import TestClient
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from service import tracing
    from service.api.app import create_app
    from service.settings import Settings

    exporter = InMemorySpanExporter()
    assert tracing.configure(exporter=exporter)
    try:
        app = create_app(Settings(model=str(FIXTURE / "checkpoint.pth"), devices="cpu", warmup=False, torch_threads=1))
        with TestClient(app) as client:
            deadline = time.monotonic() + 60  # the model loads in the background (readyz: starting)
            while client.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline, "the model did not load within 60 s"
                time.sleep(0.05)
            headers = {"traceparent": f"00-{TRACE}-{PARENT}-01", "X-Request-ID": "tree-1"}
            data = {"tokens": "96", "include_reconstruction": "true"}
            r = client.post("/v1/tokenize", files={"file": ("a.png", PHOTO.read_bytes())}, data=data, headers=headers)
            assert r.status_code == 200, r.text
            miss = exporter.get_finished_spans()
            exporter.clear()
            r = client.post("/v1/tokenize", files={"file": ("a.png", PHOTO.read_bytes())}, data=data,
                            headers={"X-Request-ID": "tree-2"})
            assert r.json()["results"][0]["cached"]
            hit = exporter.get_finished_spans()
    finally:
        tracing.shutdown()

    def tree(spans):
        by_id = {s.context.span_id: s for s in spans}
        children: dict = {}
        for s in spans:
            parent = s.parent.span_id if s.parent is not None else None
            children.setdefault(by_id[parent].name if parent in by_id else None, []).append(s.name)
        return {k: sorted(v) for k, v in children.items()}, by_id

    t, by_id = tree(miss)
    root = [s for s in miss if s.parent is not None and s.parent.span_id == int(PARENT, 16)]
    assert len(root) == 1 and format(root[0].context.trace_id, "032x") == TRACE
    assert t[root[0].name] == ["cache lookup", "cache merge", "engine", "image decode", "reconstruct"]
    assert t["engine"] == ["compute", "queue wait"]
    compute = next(s for s in miss if s.name == "compute")
    assert [e.attributes["alit.iteration"] for e in compute.events] == [1, 2, 3]
    wait = next(s for s in miss if s.name == "queue wait")
    assert wait.end_time <= compute.start_time + 1000 and compute.end_time <= next(
        s for s in miss if s.name == "engine").end_time
    assert all(s.attributes.get("alit.request_id") == "tree-1" for s in miss)
    t, _ = tree(hit)
    root = next(s for s in hit if s.kind.name == "SERVER")
    assert t[root.name] == ["cache lookup", "reconstruct"]  # a hit on bytes seen before: no decode, engine, merge
    assert all(s.attributes.get("alit.request_id") == "tree-2" for s in hit)


def test_tracing_is_off_by_default(monkeypatch):
    from service import tracing

    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    assert tracing.configure() is False and not tracing.ENABLED
    with tracing.span("anything") as s:
        assert s is None
    assert tracing.inject_headers() == {}
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with pytest.raises(ValueError, match="OTEL_TRACES_EXPORTER"):
        tracing.configure()


def test_triton_spans_join_the_api_trace(start_server, monkeypatch, tmp_path):
    """ALIT_ENGINE=triton: the API passes traceparent to a real tritonserver started with its
    OpenTelemetry tracing (as the README says); Triton's spans arrive at an OTLP/HTTP receiver with
    the caller's trace id, its request span a child of the API's `engine` span."""
    import http.server
    import subprocess
    import threading
    import time
    import urllib.request

    from conftest import free_port
    from service.triton_launcher import TritonPorts, command, prepare_runtime

    received: list[dict] = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # Triton exports OTLP over HTTP as JSON, ids in hex
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            received.extend(sp for rs in body["resourceSpans"] for ss in rs["scopeSpans"] for sp in ss["spans"])
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    collector = http.server.HTTPServer(("127.0.0.1", free_port()), Receiver)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    ports = TritonPorts(free_port(), free_port(), free_port())
    cmd, env = command(prepare_runtime(tmp_path / "runtime"), ports, exit_timeout=3,
                       extra_env={"ALIT_MODEL": str(FIXTURE / "checkpoint.pth"), "ALIT_TORCH_THREADS": "1"})
    cmd += ["--trace-config", "mode=opentelemetry", "--trace-config", "level=TIMESTAMPS", "--trace-config", "rate=0",
            "--trace-config", "count=-1", "--trace-config",
            f"opentelemetry,url=http://127.0.0.1:{collector.server_address[1]}/v1/traces",
            "--trace-config", "opentelemetry,bsp_schedule_delay=200"]
    log = tmp_path / "triton.log"
    with open(log, "w") as out:
        triton = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert triton.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{ports.http}/v2/models/alit/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.3)
        monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
        monkeypatch.setenv("PYTHONUNBUFFERED", "1")
        srv = start_server(engine="triton", triton_url=f"127.0.0.1:{ports.grpc}", log_format="json")
        r = httpx.post(srv.url + "/v1/tokenize", files={"file": ("a.png", PHOTO.read_bytes())}, data={"tokens": "64"},
                       headers={"traceparent": f"00-{TRACE}-{PARENT}-01"}, timeout=60)
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 20
        while not any(s["name"] == "InferRequest" for s in received) and time.monotonic() < deadline:
            time.sleep(0.2)
        srv.stop()
    finally:
        triton.terminate()
        triton.wait(timeout=30)
        collector.shutdown()
    ours = {s["name"]: s for s in received if s["traceId"] == TRACE}
    assert {"InferRequest", "alit", "compute"} <= set(ours), received
    api_spans = [o for o in json_objects(srv.log.read_text()) if "context" in o]
    engine = next(s for s in api_spans if s["name"] == "engine")
    assert ours["InferRequest"]["parentSpanId"] == engine["context"]["span_id"][2:]
