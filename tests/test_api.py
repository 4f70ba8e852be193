"""The HTTP API through a real uvicorn server on a free port, with real Redis.

Every test runs twice: on the in-process engine and with ALIT_ENGINE=triton against the session's
real tritonserver (the `engine` fixture; `start_server` picks it up)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import FIXTURE, ROOT

pytestmark = pytest.mark.usefixtures("engine")

PHOTOS = sorted((FIXTURE / "images").rglob("*.*"))


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def noise_png(seed: int, size: int = 80) -> bytes:
    return png_bytes(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def tokenize(url: str, data: bytes, **target) -> httpx.Response:
    return httpx.post(url + "/v1/tokenize", files={"file": ("img.png", data, "image/png")},
                      data={k: str(v) for k, v in target.items()}, timeout=60)


# ----- cache --------------------------------------------------------------------------------------


def test_looser_target_after_stricter_is_a_cache_hit_without_engine_work(start_server, shared_redis_url, cache_prefix):
    srv = start_server(redis_url=shared_redis_url, cache_prefix=cache_prefix)
    data = PHOTOS[0].read_bytes()
    strict = tokenize(srv.url, data, max_l1=0.0001)  # never met: every iteration measured
    assert strict.status_code == 200, strict.text
    s = strict.json()["results"][0]
    assert s["cached"] is False and s["target_met"] is False and s["iterations"] == 8
    engine_before = srv.metric("alit_cache_requests_total", result="miss")
    for target in ({"max_l1": 0.95}, {"tokens": 96}, {"min_psnr": 1.0}, {"max_l1": 0.0002}):
        r = tokenize(srv.url, data, **target)
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["cached"] is True, target
    assert srv.metric("alit_cache_requests_total", result="miss") - engine_before == 0  # nothing reached an engine
    assert tokenize(srv.url, data, tokens=96).json()["results"][0]["token_ids"] == s_prefix_ids(srv, data, 3)
    assert srv.metric("alit_cache_requests_total", result="hit") >= 4


def s_prefix_ids(srv, data: bytes, iteration: int) -> list[int]:
    r = httpx.post(srv.url + "/v1/tokenize", json={"images": [{"image": b64(data), "target": {"max_l1": 0.0001}}],
                                                  "all_iterations": True}, timeout=60).json()
    return r["results"][0]["all_iterations"][iteration - 1]["token_ids"]


def test_twenty_concurrent_identical_requests_compute_once(start_server, shared_redis_url, cache_prefix):
    srv = start_server(redis_url=shared_redis_url, cache_prefix=cache_prefix)
    data = PHOTOS[3].read_bytes()
    before = srv.metric("alit_cache_requests_total", result="miss")

    async def go():
        async with httpx.AsyncClient(timeout=60) as c:
            return await asyncio.gather(*[
                c.post(srv.url + "/v1/tokenize", files={"file": ("a.png", data, "image/png")}, data={"max_l1": "0.5"})
                for _ in range(20)])

    responses = asyncio.run(go())
    assert [r.status_code for r in responses] == [200] * 20
    ids = {tuple(r.json()["results"][0]["token_ids"]) for r in responses}
    assert len(ids) == 1
    assert srv.metric("alit_cache_requests_total", result="miss") - before == 1  # one engine computation


def test_redis_down_then_back(start_server, own_redis):
    srv = start_server(redis_url=own_redis.url)
    images = [p.read_bytes() for p in PHOTOS[:4]]
    for d in images:
        assert tokenize(srv.url, d, tokens=64).status_code == 200
    assert all(tokenize(srv.url, d, tokens=64).json()["results"][0]["cached"] for d in images)

    own_redis.stop()
    for d in images + [noise_png(1)]:
        r = tokenize(srv.url, d, tokens=128)
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["cached"] is False  # bypassed: computed, not lost
    assert srv.metric("alit_cache_errors_total") >= 1
    assert srv.metric("alit_cache_available") == 0

    own_redis.start()  # same port, empty
    deadline = time.monotonic() + 40
    cached = False
    while time.monotonic() < deadline and not cached:
        assert tokenize(srv.url, images[0], tokens=160).status_code == 200
        cached = tokenize(srv.url, images[0], tokens=160).json()["results"][0]["cached"]
        time.sleep(0.3)
    assert cached, "hits did not resume after Redis came back"
    assert srv.metric("alit_cache_available") == 1


# ----- responses ----------------------------------------------------------------------------------


def test_json_batch_with_reconstruction_and_all_iterations(start_server):
    srv = start_server()
    body = {"images": [{"image": b64(PHOTOS[0].read_bytes()), "target": {"tokens": 64}},
                       {"image": b64(PHOTOS[1].read_bytes()), "target": {"max_l1": 0.99}}],
            "include_reconstruction": True, "all_iterations": True}
    r = httpx.post(srv.url + "/v1/tokenize", json=body, timeout=60)
    assert r.status_code == 200, r.text
    j = r.json()
    assert j["model"]["fingerprint"] and len(j["results"]) == 2
    a, b = j["results"]
    assert a["num_tokens"] == 64 and a["l1"] is None and len(a["all_iterations"]) == 2
    assert b["target_met"] and b["l1"] <= 0.99 and b["num_tokens"] == 32 * b["iterations"]
    img = Image.open(io.BytesIO(base64.b64decode(a["reconstruction_png"])))
    assert img.size == (64, 64)
    # reconstruct gives the same picture from the ids alone
    png = httpx.post(srv.url + "/v1/reconstruct", json={"token_ids": a["token_ids"]},
                     headers={"Accept": "image/png"}, timeout=60)
    assert png.headers["content-type"] == "image/png"
    decoded = lambda raw: np.asarray(Image.open(io.BytesIO(raw)), dtype=int)  # noqa: E731
    # same picture; batch-mates may move a value across a rounding boundary by one level
    assert np.abs(decoded(png.content) - decoded(base64.b64decode(a["reconstruction_png"]))).max() <= 1
    batch = httpx.post(srv.url + "/v1/reconstruct", json={"token_ids": [a["token_ids"], b["token_ids"]]}, timeout=60)
    assert [i["num_tokens"] for i in batch.json()["images"]] == [64, b["num_tokens"]]
    # the unversioned aliases
    assert httpx.post(srv.url + "/tokenize", files={"file": ("a.png", PHOTOS[0].read_bytes())},
                      data={"tokens": "32"}, timeout=60).status_code == 200
    assert httpx.post(srv.url + "/reconstruct", json={"token_ids": a["token_ids"]}, timeout=60).status_code == 200


def test_stream_events_arrive_per_iteration_before_the_result(start_server):
    srv = start_server()
    arrivals = []
    with httpx.stream("POST", srv.url + "/v1/tokenize?stream=true", timeout=60,
                      files={"file": ("a.png", PHOTOS[2].read_bytes(), "image/png")}, data={"max_l1": "0.0001"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
        for line in r.iter_lines():
            if line:
                arrivals.append((time.monotonic(), json.loads(line)))
    events = [e for _, e in arrivals]
    assert [e["event"] for e in events] == ["iteration"] * 8 + ["result"]
    assert [e["iteration"] for e in events[:8]] == list(range(1, 9))
    assert [e["num_tokens"] for e in events[:8]] == [32 * k for k in range(1, 9)]
    assert events[-1]["iterations"] == 8 and events[-1]["target_met"] is False
    # delivered progressively: the first event came well before the result
    assert arrivals[-1][0] - arrivals[0][0] > 0.005


# ----- errors ---------------------------------------------------------------------------------------


def _err(r: httpx.Response, status: int, code: str, fragment: str = "") -> dict:
    assert r.status_code == status, r.text
    e = r.json()["error"]
    assert e["code"] == code and fragment in e["message"], e
    return e


def test_every_error_class(start_server, tmp_path):
    srv = start_server(max_image_bytes=200_000, max_image_pixels=1_000_000, max_body_bytes=2_000_000,
                       max_batch_images=2)
    u, photo = srv.url, PHOTOS[0].read_bytes()
    _err(tokenize(u, b"hello, I am text"), 415, "unsupported_image", "not a recognised image")
    _err(tokenize(u, photo[: len(photo) // 2]), 422, "invalid_image", "corrupt or truncated")
    _err(tokenize(u, b""), 422, "empty_image")
    _err(tokenize(u, noise_png(0, 400)), 413, "image_too_large", "bytes")
    big = png_bytes(np.zeros((1200, 1200, 3), np.uint8))
    _err(tokenize(u, big), 413, "image_too_large", "pixels")
    _err(tokenize(u, photo, tokens=33), 422, "invalid_target", "tokens: must be a multiple of 32")
    _err(tokenize(u, photo, tokens=64, max_l1=0.1), 422, "invalid_target", "cannot be combined")
    e = _err(tokenize(u, photo, bogus=1), 422, "invalid_request", "bogus")
    assert e["detail"]["field"] == "bogus"
    _err(tokenize(u, photo, max_l1="abc"), 422, "invalid_target", "max_l1")
    j = httpx.post(u + "/v1/tokenize", json={"images": [{"image": "%%%"}]})
    _err(j, 422, "invalid_base64", "images.0.image")
    j = httpx.post(u + "/v1/tokenize", json={"images": [{"image": b64(photo), "target": {"max_l1": 2}}]})
    _err(j, 422, "invalid_target", "max_l1")
    j = httpx.post(u + "/v1/tokenize", json={"images": [{"image": b64(photo), "target": {"quality": 2}}]})
    _err(j, 422, "invalid_request", "quality")
    j = httpx.post(u + "/v1/tokenize", json={"images": [{"image": b64(photo)}] * 3})
    _err(j, 413, "too_many_images", "limit per request is 2")
    _err(httpx.post(u + "/v1/tokenize", content=b"x" * 3_000_000, headers={"content-type": "application/json"}),
         413, "body_too_large")

    def chunks():
        for _ in range(40):
            yield b"y" * 100_000

    _err(httpx.post(u + "/v1/tokenize", content=chunks(), headers={"content-type": "application/json"}),
         413, "body_too_large")
    _err(httpx.post(u + "/v1/tokenize", content=b"{", headers={"content-type": "application/json"}),
         422, "invalid_request")
    _err(httpx.post(u + "/v1/tokenize", content=b"abc", headers={"content-type": "text/plain"}),
         415, "unsupported_media_type")
    _err(httpx.post(u + "/v1/reconstruct", json={"token_ids": list(range(33))}), 422, "invalid_tokens", "multiple of 32")
    _err(httpx.post(u + "/v1/reconstruct", json={"token_ids": [999] * 32}), 422, "invalid_tokens", "[0, 255]")
    _err(httpx.post(u + "/v1/reconstruct", json={"token_ids": []}), 422, "invalid_tokens")
    _err(httpx.post(u + "/v1/reconstruct", json={"token_ids": ["a"] * 32}), 422, "invalid_request", "token_ids")
    _err(httpx.post(u + "/v1/tokenize", files={"file": ("a.png", photo)}, headers={"X-Request-Timeout": "0.00001"},
                    data={"max_l1": "0.0001"}, timeout=60), 504, "deadline_exceeded")
    _err(httpx.post(u + "/v1/tokenize", files={"file": ("a.png", photo)}, headers={"X-Request-Timeout": "soon"}),
         422, "invalid_request", "X-Request-Timeout")
    _err(httpx.get(u + "/v1/nothing"), 404, "not_found")
    assert httpx.get(u + "/readyz").status_code == 200  # still healthy after all of it


def test_auth(start_server):
    srv = start_server(api_keys="k1,secret-2")
    photo = PHOTOS[0].read_bytes()
    _err(tokenize(srv.url, photo), 401, "unauthorized", "missing API key")
    r = httpx.post(srv.url + "/v1/tokenize", files={"file": ("a.png", photo)}, headers={"Authorization": "Bearer nope"})
    _err(r, 401, "unauthorized", "invalid API key")
    assert r.headers["www-authenticate"] == "Bearer"
    ok = httpx.post(srv.url + "/v1/tokenize", files={"file": ("a.png", photo)}, data={"tokens": "32"},
                    headers={"Authorization": "Bearer secret-2"}, timeout=60)
    assert ok.status_code == 200
    assert httpx.get(srv.url + "/healthz").status_code == 200  # probes need no key


def test_queue_full_is_503_with_retry_after_and_nothing_else_fails(start_server):
    srv = start_server(max_queue=2, max_batch=1)
    images = [p.read_bytes() for p in PHOTOS] + [noise_png(s) for s in range(9)]

    async def go():
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(*[
                c.post(srv.url + "/v1/tokenize", files={"file": ("a.png", d)}, data={"max_l1": "0.0001"})
                for d in images])

    responses = asyncio.run(go())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503} and 503 in codes and 200 in codes, codes
    for r in responses:
        if r.status_code == 503:
            _err(r, 503, "overloaded", "queue full")
            assert int(r.headers["retry-after"]) >= 1
    assert srv.metric("alit_rejected_total", reason="queue_full") == codes.count(503)


def test_sigterm_with_30_in_flight_completes_all(start_server):
    srv = start_server(max_batch=4, drain_seconds=60)
    images = [p.read_bytes() for p in PHOTOS] + [noise_png(s) for s in range(23)]

    async def go():
        async with httpx.AsyncClient(timeout=120) as c:
            tasks = [asyncio.create_task(c.post(srv.url + "/v1/tokenize", files={"file": ("a.png", d)},
                                                data={"max_l1": "0.0001"})) for d in images]
            await asyncio.sleep(0.5)  # all sent; most are queued or computing
            srv.proc.send_signal(15)
            await asyncio.sleep(0.2)
            try:
                late = await c.post(srv.url + "/v1/tokenize", files={"file": ("a.png", images[0])})
                late_status = late.status_code
            except httpx.TransportError:
                late_status = "refused"
            ready = None
            try:
                ready = (await c.get(srv.url + "/readyz")).status_code
            except httpx.TransportError:
                ready = "refused"
            return await asyncio.gather(*tasks), late_status, ready

    responses, late, ready = asyncio.run(go())
    assert [r.status_code for r in responses] == [200] * 30
    assert late in (503, "refused") and ready in (503, "refused")
    assert srv.proc.wait(timeout=60) == 0


def test_openapi_describes_every_endpoint_schema_and_error(start_server):
    srv = start_server()
    spec = httpx.get(srv.url + "/openapi.json").json()
    paths = spec["paths"]
    for p in ("/v1/tokenize", "/v1/reconstruct", "/v1/models", "/healthz", "/readyz", "/metrics", "/tokenize", "/reconstruct"):
        assert p in paths, p
    tok = paths["/v1/tokenize"]["post"]
    assert {"multipart/form-data", "application/json"} <= set(tok["requestBody"]["content"])
    for code in ("401", "404", "413", "415", "422", "503", "504"):
        assert tok["responses"][code]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    schemas = spec["components"]["schemas"]
    for name in ("TokenizeJSON", "TokenizeForm", "TokenizeResponse", "TokenizeResultOut", "TargetSpec",
                 "ReconstructJSON", "ReconstructResponse", "ModelList", "ErrorResponse"):
        assert name in schemas, name
    # the multipart form: every field the endpoint reads, typed (generated from the pydantic model)
    ref = tok["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
    form = schemas[ref.rsplit("/", 1)[1]]
    props = form["properties"]
    assert set(props) == {"file", "max_l1", "min_psnr", "tokens", "max_tokens", "include_reconstruction",
                          "all_iterations", "stream", "model"}, set(props)
    assert form["required"] == ["file"] and form["additionalProperties"] is False
    assert props["file"]["type"] == "string"
    assert {"number", "null"} == {t["type"] for t in props["max_l1"]["anyOf"]}
    assert {"integer", "null"} == {t["type"] for t in props["tokens"]["anyOf"]}
    assert props["stream"]["type"] == "boolean"


def test_readme_configuration_table_matches_settings():
    from service.settings import Settings

    readme = (ROOT / "README.md").read_text()
    documented = set(re.findall(r"^\| `(ALIT_[A-Z0-9_]+)` \|", readme, re.M))
    actual = {f"ALIT_{name.upper()}" for name in Settings.model_fields}
    assert documented == actual, (actual - documented, documented - actual)


def test_readme_curl_examples_work(start_server, tmp_path):
    """Every curl line of the README's API section, run by bash against a real server (port swapped)."""
    import shutil
    import subprocess

    readme = (ROOT / "README.md").read_text()
    api = readme[readme.index("## API"):readme.index("## Deployment")]
    blocks = re.findall(r"```bash\n(.*?)```", api, re.S)
    commands = [b.strip() for b in blocks if "curl" in b]
    assert len(commands) >= 4
    srv = start_server()
    shutil.copy(PHOTOS[0], tmp_path / "photo.png")
    for cmd in commands:
        cmd = cmd.replace("localhost:8000", f"127.0.0.1:{srv.port}")
        out = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, (cmd, out.stderr)
        assert '"error"' not in out.stdout, (cmd, out.stdout[:300])
    assert Image.open(tmp_path / "recon.png").size == (64, 64)


def test_python_client_and_cli(start_server, tmp_path):
    import subprocess
    import sys

    from service.client import AlitError, AsyncClient, Client

    srv = start_server()
    with Client(srv.url) as c:
        r = c.tokenize(PHOTOS[0], tokens=64, all_iterations=True)
        assert r["num_tokens"] == 64 and len(r["all_iterations"]) == 2
        png = c.reconstruct(r["token_ids"])
        assert Image.open(io.BytesIO(png)).size == (64, 64)
        events = list(c.tokenize_stream(PHOTOS[1], max_l1=0.0001, max_tokens=96))
        assert [e["event"] for e in events] == ["iteration"] * 3 + ["result"]
        try:
            c.tokenize(PHOTOS[0], tokens=33)
            raise AssertionError("expected an error")
        except AlitError as e:
            assert e.status == 422 and e.code == "invalid_target"
        assert c.models()["data"][0]["max_tokens"] == 256

    async def go():
        async with AsyncClient(srv.url) as c:
            return await asyncio.gather(*[c.tokenize(p.read_bytes(), tokens=32) for p in PHOTOS[:3]])

    assert [x["num_tokens"] for x in asyncio.run(go())] == [32, 32, 32]

    cli = [sys.executable, "-m", "service.cli"]
    out = subprocess.run([*cli, "tokenize", str(PHOTOS[2]), "--url", srv.url, "--tokens", "96"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    ids = json.loads(out.stdout)["token_ids"]
    assert len(ids) == 96
    (tmp_path / "ids.json").write_text(json.dumps(ids))
    out = subprocess.run([*cli, "reconstruct", str(tmp_path / "ids.json"), "--url", srv.url, "-o", str(tmp_path / "r.png")],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert Image.open(tmp_path / "r.png").size == (64, 64)
    bad = subprocess.run([*cli, "tokenize", str(PHOTOS[2]), "--url", srv.url, "--tokens", "33"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert bad.returncode == 1 and "invalid_target" in bad.stderr


def test_a_client_that_goes_away_frees_its_slot(start_server):
    srv = start_server(max_batch=1)
    before = srv.metric("alit_rejected_total", reason="cancelled")
    body = {"images": [{"image": b64(noise_png(s)), "target": {"max_l1": 0.0001}} for s in range(16)]}
    t0 = time.monotonic()
    try:  # 16 long images one at a time (several seconds); the client gives up after 0.5 s
        httpx.post(srv.url + "/v1/tokenize", json=body, timeout=0.5)
    except httpx.TimeoutException:
        pass
    deadline = time.monotonic() + 10
    in_engine = ("alit_active_images", "alit_encoded_images", "alit_queue_depth")
    while time.monotonic() < deadline and sum(srv.metric(m) for m in in_engine) > 0:
        time.sleep(0.05)
    freed_after = time.monotonic() - t0
    assert srv.metric("alit_rejected_total", reason="cancelled") - before >= 8  # most never computed
    r = tokenize(srv.url, PHOTOS[5].read_bytes(), tokens=32)  # the slot serves the next request
    assert r.status_code == 200
    assert freed_after < 5, freed_after
