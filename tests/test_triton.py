"""The model repository on a real tritonserver (from the nvidia-pytriton wheel), driven by tritonclient."""

from __future__ import annotations

import asyncio
import io
import queue
import time

import numpy as np
import pytest
from PIL import Image

from conftest import FIXTURE, terminate

tritonclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient is part of the test extras")
PHOTOS = sorted((FIXTURE / "images").rglob("*.*"))
TARGETS = [{"MAX_L1": 0.8775}, {"TOKENS": 96}, {"MIN_PSNR": 3.0}, {"MAX_L1": 0.3, "MAX_TOKENS": 128},
           {"TOKENS": 256}, {"MAX_L1": 0.0001}, {}, {"MIN_PSNR": 2.0, "MAX_TOKENS": 64}]
DTYPES = {"MAX_L1": ("FP32", np.float32), "MIN_PSNR": ("FP32", np.float32), "TOKENS": ("INT32", np.int32),
          "MAX_TOKENS": ("INT32", np.int32)}


@pytest.fixture(scope="module")
def triton(triton_ports):
    return triton_ports


UNSET = {"MAX_L1": float("nan"), "MIN_PSNR": float("nan"), "TOKENS": 0, "MAX_TOKENS": 0}


def _inputs(image: bytes | None, target: dict, pixels: np.ndarray | None = None, all_fields: bool = False):
    """all_fields: send every target input (NaN / 0 = not set) so mixed targets can share a batch."""
    from tritonclient.grpc import InferInput

    if all_fields:
        target = {**UNSET, **target}
    inputs = []
    if image is not None:
        i = InferInput("IMAGE", [1, 1], "BYTES")
        i.set_data_from_numpy(np.array([[image]], dtype=object))
        inputs.append(i)
    if pixels is not None:
        i = InferInput("PIXELS", [1, *pixels.shape], "UINT8")
        i.set_data_from_numpy(pixels[None])
        inputs.append(i)
    for name, value in target.items():
        dtype, np_type = DTYPES[name]
        i = InferInput(name, [1, 1], dtype)
        i.set_data_from_numpy(np.array([[value]], dtype=np_type))
        inputs.append(i)
    return inputs


def infer_many(port: int, requests: list[tuple], all_fields: bool = False) -> dict[str, object]:
    """Send all requests at once on one gRPC stream (decoupled model); collect results by id."""
    from tritonclient.grpc import InferenceServerClient

    results: queue.Queue = queue.Queue()
    client = InferenceServerClient(f"127.0.0.1:{port}")
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        for n, (image, target, pixels) in enumerate(requests):
            client.async_stream_infer("alit", _inputs(image, target, pixels, all_fields), request_id=str(n))
        out = {}
        while len(out) < len(requests):
            result, error = results.get(timeout=120)
            if error is not None:
                out[f"error-{len(out)}"] = error
                continue
            rid = result.get_response().id
            out[rid] = {k: result.as_numpy(k) for k in ("TOKEN_IDS", "NUM_TOKENS", "ITERATIONS", "L1", "TARGET_MET")}
        return out
    finally:
        client.stop_stream()
        client.close()


def in_process(requests: list[tuple]) -> list:
    from service.engine import Engine, EngineSettings, Target, parse_target
    from service.imaging import decode_image, preprocess
    from service.model.checkpoint import load_model

    loaded = load_model(FIXTURE / "checkpoint.pth")
    names = {"MAX_L1": "max_l1", "MIN_PSNR": "min_psnr", "TOKENS": "tokens", "MAX_TOKENS": "max_tokens"}

    async def go():
        eng = Engine(loaded, EngineSettings(devices="cpu", warmup=False)).start()
        try:
            jobs = []
            for image, target, _ in requests:
                t = parse_target({names[k]: v for k, v in target.items()}, eng.limits, Target(max_l1=0.07))
                jobs.append(eng.tokenize(preprocess(decode_image(image), 64), t))
            return await asyncio.gather(*jobs)
        finally:
            eng.shutdown()

    return asyncio.run(go())


def noise_png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def triton_metrics(port: int) -> dict[str, float]:
    """Triton's /metrics as {'name{labels}': value}, its own series and our model's custom ones."""
    import httpx

    out = {}
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def metric(snapshot: dict, name: str, **labels) -> float:
    """Sum of the series called `name` whose labels include `labels`."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for k, v in snapshot.items()
               if k.split("{")[0] == name and all(w in k for w in want))


def test_32_concurrent_mixed_targets_match_the_in_process_engine_in_shared_batches(triton):
    corpus = [p.read_bytes() for p in PHOTOS] + [noise_png(s) for s in range(3)]
    requests = [(corpus[i % len(corpus)], TARGETS[i % len(TARGETS)], None) for i in range(32)]
    before = triton_metrics(triton.metrics)
    got = infer_many(triton.grpc, requests, all_fields=True)
    after = triton_metrics(triton.metrics)
    assert not [k for k in got if k.startswith("error")], got
    want = in_process(requests)
    iterations = set()
    for n, w in enumerate(want):
        g = got[str(n)]
        np.testing.assert_array_equal(g["TOKEN_IDS"][0], w.token_ids)
        assert int(g["NUM_TOKENS"][0, 0]) == w.num_tokens
        assert int(g["ITERATIONS"][0, 0]) == w.iterations
        assert bool(g["TARGET_MET"][0, 0]) == w.target_met
        if w.l1 is None:
            assert np.isnan(g["L1"][0, 0])
        else:
            assert abs(float(g["L1"][0, 0]) - w.l1) <= 1e-5
        iterations.add(w.iterations)
    assert len(iterations) >= 3
    # Triton's dynamic batcher put several requests into one execute() ...
    count = metric(after, "nv_inference_count", model="alit") - metric(before, "nv_inference_count", model="alit")
    execs = (metric(after, "nv_inference_exec_count", model="alit")
             - metric(before, "nv_inference_exec_count", model="alit"))
    assert count == 32 and execs < count, (count, execs)
    # ... and the engine's own metrics, on Triton's /metrics, saw every image halt.
    halted = metric(after, "alit_halting_iteration_count") - metric(before, "alit_halting_iteration_count")
    assert halted == 32
    assert metric(after, "alit_iteration_stage_seconds_count", stage="encoder") > 0


def test_pixels_input_equals_encoded_image(triton):
    data = PHOTOS[0].read_bytes()
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.uint8)
    got = infer_many(triton.grpc, [(data, {"TOKENS": 64}, None), (None, {"TOKENS": 64}, pixels)])
    np.testing.assert_array_equal(got["0"]["TOKEN_IDS"], got["1"]["TOKEN_IDS"])


def test_invalid_requests_get_error_responses_and_the_model_keeps_serving(triton):
    from tritonclient.utils import InferenceServerException

    got = infer_many(triton.grpc, [(b"not an image", {}, None)])
    (err,) = got.values()
    assert isinstance(err, InferenceServerException) and "not a recognised image" in str(err)
    got = infer_many(triton.grpc, [(PHOTOS[1].read_bytes(), {"TOKENS": 33}, None)])
    (err,) = got.values()
    assert "tokens: must be a multiple of 32" in str(err)
    ok = infer_many(triton.grpc, [(PHOTOS[1].read_bytes(), {"TOKENS": 32}, None)])
    assert int(ok["0"]["NUM_TOKENS"][0, 0]) == 32


def test_a_cancelled_stream_leaves_the_engine(triton):
    """Cancelling the client's stream cancels its images in the engine instead of running them out."""
    from tritonclient.grpc import InferenceServerClient

    before = metric(triton_metrics(triton.metrics), "alit_rejected_total", reason="cancelled")
    client = InferenceServerClient(f"127.0.0.1:{triton.grpc}")
    client.start_stream(callback=lambda result, error: None)
    for n in range(64):  # never meets its target: 8 iterations each, two batches' worth
        client.async_stream_infer("alit", _inputs(noise_png(n), {"MAX_L1": 0.0001}, all_fields=True), request_id=str(n))
    time.sleep(0.3)
    client.stop_stream(cancel_requests=True)
    client.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        snap = triton_metrics(triton.metrics)
        if sum(metric(snap, m) for m in ("alit_active_images", "alit_encoded_images", "alit_queue_depth")) == 0:
            break
        time.sleep(0.1)
    cancelled = metric(snap, "alit_rejected_total", reason="cancelled") - before
    assert cancelled >= 16, cancelled  # at least the images still queued never ran


def test_the_front_refuses_a_triton_serving_another_model(start_server):
    """ALIT_ENGINE=triton with different weights here and on Triton: not ready, and 503s that say why
    (never tokens from one model cached under, or decoded by, another)."""
    import httpx

    srv = start_server(engine="triton", model="preset:test_tiny", wait="/healthz")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ready = httpx.get(srv.url + "/readyz", timeout=5)
        if "another model" in ready.text:
            break
        time.sleep(0.2)
    assert ready.status_code == 503 and "another model" in ready.json()["error"]["message"], ready.text
    r = httpx.post(srv.url + "/v1/tokenize", files={"file": ("a.png", PHOTOS[0].read_bytes())}, timeout=60)
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable", r.text
    assert "another model" in r.json()["error"]["message"] and r.headers["retry-after"]


def test_the_front_answers_503_while_triton_is_unreachable(start_server):
    import httpx

    from conftest import free_port

    srv = start_server(engine="triton", triton_url=f"127.0.0.1:{free_port()}", wait="/healthz")
    deadline = time.monotonic() + 30
    while (ready := httpx.get(srv.url + "/readyz", timeout=5)).json()["error"]["code"] == "starting":
        assert time.monotonic() < deadline, "the model never finished loading"
        time.sleep(0.1)
    assert ready.status_code == 503 and "unreachable" in ready.json()["error"]["message"], ready.text
    r = httpx.post(srv.url + "/v1/tokenize", files={"file": ("a.png", PHOTOS[0].read_bytes())}, timeout=60)
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable", r.text


def test_make_triton_and_serve_without_alit_model_agree_on_the_shipped_weights(tmp_path, start_server):
    """The README's path with no ALIT_MODEL anywhere: `alit-serve triton` (what `make triton` runs)
    and `ALIT_ENGINE=triton alit-serve serve` both default to the packaged service/weights/, so the front is
    ready and tokenizes (the Triton model once fell back to a random preset: 503 on both)."""
    import os
    import subprocess

    import httpx

    from conftest import CLI, ROOT, free_port, wait_http

    ports = [free_port() for _ in range(3)]
    env = {k: v for k, v in os.environ.items() if k != "ALIT_MODEL"}
    env.update(PYTHONPATH=str(ROOT), ALIT_TORCH_THREADS=os.environ.get("ALIT_TEST_THREADS", "2"))
    log = tmp_path / "triton.log"
    with open(log, "w") as out:
        triton = subprocess.Popen([*CLI, "triton", "--runtime", str(tmp_path / "runtime"), "--http-port", str(ports[0]),
                                   "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2])],
                                  cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{ports[0]}/v2/models/alit/ready", triton, timeout=180, log=log)
        srv = start_server(engine="triton", triton_url=f"127.0.0.1:{ports[1]}", model=None, wait="/healthz")
        deadline = time.monotonic() + 30
        while (ready := httpx.get(srv.url + "/readyz", timeout=5)).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ready.status_code == 200, ready.text
        assert ready.json()["model"]["id"] == "alit-serve-default"
        r = httpx.post(srv.url + "/v1/tokenize", files={"file": ("a.png", PHOTOS[0].read_bytes())},
                       data={"max_l1": "0.3"}, timeout=120)
        assert r.status_code == 200, r.text
        res = r.json()["results"][0]
        assert res["num_tokens"] > 0 and res["num_tokens"] % 32 == 0 and res["cached"] is False
    finally:
        terminate(triton, timeout=20)
