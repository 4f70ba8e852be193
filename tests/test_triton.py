"""The model repository on a real tritonserver (from the nvidia-pytriton wheel), driven by tritonclient.
The session's tritonserver serves the ALIT fixture as `alit` and the KARL fixture as `karl` (conftest)."""

from __future__ import annotations

import asyncio
import io
import queue
import time

import numpy as np
import pytest
from PIL import Image

from conftest import FIXTURE, KARL_FIXTURE, ODP_FIXTURE, ROOT, terminate

tritonclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient is part of the test extras")
PHOTOS = sorted((FIXTURE / "images").rglob("*.*"))
KARL_PHOTOS = sorted((KARL_FIXTURE / "images").rglob("*.*"))
ODP_PHOTOS = sorted((ODP_FIXTURE / "images").rglob("*.*"))
OUTPUTS = ("TOKEN_IDS", "POSITIONS", "PROBE", "NUM_TOKENS", "ITERATIONS", "L1", "TARGET_MET", "IS_FINAL")
TARGETS = [{"MAX_L1": 0.8775}, {"TOKENS": 96}, {"MIN_PSNR": 3.0}, {"MAX_L1": 0.3, "MAX_TOKENS": 128},
           {"TOKENS": 256}, {"MAX_L1": 0.0001}, {}, {"MIN_PSNR": 2.0, "MAX_TOKENS": 64}]
DTYPES = {"MAX_L1": ("FP32", np.float32), "MIN_PSNR": ("FP32", np.float32), "TOKENS": ("INT32", np.int32),
          "MAX_TOKENS": ("INT32", np.int32), "ALL_ITERATIONS": ("BOOL", bool)}


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


def infer_many(port: int, requests: list[tuple], all_fields: bool = False, model: str = "alit",
               every: bool = False) -> dict[str, object]:
    """Send all requests at once on one gRPC stream (decoupled model); collect the final results by
    id, and with `every` (ALL_ITERATIONS) each request's per-probe responses too, as `ID/probes`."""
    from tritonclient.grpc import InferenceServerClient

    results: queue.Queue = queue.Queue()
    client = InferenceServerClient(f"127.0.0.1:{port}")
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        for n, (image, target, pixels) in enumerate(requests):
            target = {**target, "ALL_ITERATIONS": True} if every else target
            client.async_stream_infer(model, _inputs(image, target, pixels, all_fields), request_id=str(n))
        out: dict[str, object] = {}
        done = 0
        while done < len(requests):
            result, error = results.get(timeout=120)
            if error is not None:
                out[f"error-{done}"] = error
                done += 1
                continue
            rid = result.get_response().id
            got = {k: result.as_numpy(k) for k in OUTPUTS}
            if got["IS_FINAL"][0, 0]:
                out[rid] = got
                done += 1
            else:
                out.setdefault(f"{rid}/probes", []).append(got)  # type: ignore[union-attr]
        return out
    finally:
        client.stop_stream()
        client.close()


NAMES = {"MAX_L1": "max_l1", "MIN_PSNR": "min_psnr", "TOKENS": "tokens", "MAX_TOKENS": "max_tokens"}


def in_process(requests: list[tuple], weights=FIXTURE / "checkpoint.pth") -> list:
    """What the in-process engine answers for the same requests (with each one's trajectory)."""
    from service.engine import Engine, EngineSettings, Target, parse_target
    from service.imaging import load_for_model
    from service.model.registry import resolve

    loaded = resolve(str(weights))

    async def go():
        eng = Engine(loaded, EngineSettings(devices="cpu", warmup=False)).start()
        try:
            jobs = []
            for image, target, _ in requests:
                t = parse_target({NAMES[k]: v for k, v in target.items()}, eng.limits, Target(max_l1=0.07))
                pixels = load_for_model(image, eng.limits.img_size, resample=eng.limits.resample)
                jobs.append(eng.tokenize(pixels, t, trajectory=True))
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
        assert int(g["PROBE"][0, 0]) == w.selected_iteration and g["POSITIONS"].shape == (1, 0)  # ALIT: none
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
    halted = (metric(after, "alit_halting_iteration_count", model="alit")
              - metric(before, "alit_halting_iteration_count", model="alit"))
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


# ----- KARL beside ALIT: one tritonserver, two models; the front over both ---------------------------------

KARL_TARGETS = [{"MAX_L1": 0.05}, {"MAX_L1": 0.1, "MAX_TOKENS": 128}, {}, {"MAX_L1": 0.02, "MAX_TOKENS": 16}]


def test_the_karl_model_answers_what_the_in_process_engine_does(triton):
    """Triton's `karl` (the KARL fixture, by ALIT_MODELS) returns the in-process engine's ids, positions
    and probe; its per-probe responses carry theirs; a target KARL cannot honour is an error naming it."""
    corpus = [p.read_bytes() for p in KARL_PHOTOS]
    requests = [(corpus[i], KARL_TARGETS[i % len(KARL_TARGETS)], None) for i in range(len(corpus))]
    got = infer_many(triton.grpc, requests, all_fields=True, model="karl", every=True)
    assert not [k for k in got if k.startswith("error")], got
    want = in_process(requests, weights=KARL_FIXTURE)
    for n, w in enumerate(want):
        g = got[str(n)]
        assert w.positions is not None and w.positions.shape == w.token_ids.shape
        np.testing.assert_array_equal(g["TOKEN_IDS"][0], w.token_ids)
        np.testing.assert_array_equal(g["POSITIONS"][0], w.positions)
        assert int(g["PROBE"][0, 0]) == w.selected_iteration
        assert int(g["ITERATIONS"][0, 0]) == w.iterations and int(g["NUM_TOKENS"][0, 0]) == w.num_tokens
        assert bool(g["TARGET_MET"][0, 0]) == w.target_met and abs(float(g["L1"][0, 0]) - w.l1) <= 1e-5
        # one response per probe, as it completed: the in-process trajectory, with keys and positions
        probes = got[f"{n}/probes"]
        assert [int(p["PROBE"][0, 0]) for p in probes] == [r.iteration for r in w.trajectory]
        assert [int(p["ITERATIONS"][0, 0]) for p in probes] == list(range(1, len(probes) + 1))
        for p, r in zip(probes, w.trajectory):
            np.testing.assert_array_equal(p["TOKEN_IDS"][0], r.token_ids)
            np.testing.assert_array_equal(p["POSITIONS"][0], r.positions)
    assert {int(got[str(n)]["PROBE"][0, 0]) for n in range(len(want))} >= {256 * 32 + 5, 128 * 32 + 9, 16 * 32 + 2}

    (err,) = infer_many(triton.grpc, [(corpus[0], {"MIN_PSNR": 30.0}, None)], model="karl").values()
    assert "'karl'" in str(err) and "min_psnr" in str(err) and "accepts max_l1, max_tokens" in str(err), err

    # the front's client of Triton (TritonEngine): ready on `karl` (its probe request is a target KARL
    # takes), the same answer with and without the per-probe responses (then PROBE names the answer's)
    from service.engine import Target
    from service.engine.triton_client import TritonEngine
    from service.imaging import load_for_model
    from service.model.registry import resolve

    remote = TritonEngine(resolve(str(KARL_FIXTURE)), f"127.0.0.1:{triton.grpc}", model_name="karl").start()
    try:
        assert remote.ready, remote.problem
        w = want[0]
        for trajectory in (False, True):
            r = asyncio.run(remote.tokenize(load_for_model(corpus[0], 64), Target(max_l1=0.05), trajectory=trajectory))
            np.testing.assert_array_equal(r.token_ids, w.token_ids)
            np.testing.assert_array_equal(r.positions, w.positions)
            assert (r.selected_iteration, r.iterations, r.target_met) == (w.selected_iteration, w.iterations,
                                                                         w.target_met)
            assert (r.trajectory is not None) == trajectory
    finally:
        remote.shutdown()


def test_the_client_reads_a_server_without_probe_and_positions():
    """A model.py older than the PROBE / POSITIONS outputs: the records' keys come from ITERATIONS
    (ALIT's per-iteration responses), positions are None, and an answer that names no probe is only
    taken through the halting rule over the per-probe responses (the client then always asks for them)."""
    from service.engine import StepFailed, Target
    from service.engine.triton_client import TritonEngine
    from service.model.registry import resolve

    (w,) = in_process([(PHOTOS[0].read_bytes(), {"MAX_L1": 0.3}, None)])
    remote = TritonEngine(resolve(str(FIXTURE / "checkpoint.pth")), "127.0.0.1:1")

    class Old:  # a response of the older server: no PROBE, no POSITIONS
        def __init__(self, rec, iterations: int, final: bool, met: bool):
            self.out = {"MODEL_FINGERPRINT": np.array([[remote.loaded.fingerprint.encode()]], dtype=object),
                        "TOKEN_IDS": rec.token_ids[None], "ITERATIONS": np.array([[iterations]], np.int32),
                        "L1": np.array([[rec.l1]], np.float32), "PSNR": np.array([[rec.psnr]], np.float32),
                        "TARGET_MET": np.array([[met]]), "IS_FINAL": np.array([[final]])}

        def as_numpy(self, name):
            return self.out.get(name)

    chosen = next(r for r in w.trajectory if r.iteration == w.selected_iteration)
    replies = [remote._record(Old(r, r.iteration, False, False)) for r in w.trajectory]
    assert [(x.record.iteration, x.record.positions, x.keyed) for x in replies] == [
        (r.iteration, None, True) for r in w.trajectory]
    final = remote._record(Old(chosen, w.iterations, True, w.target_met))
    assert not final.keyed and remote._keyed
    answer = remote._answer(Target(max_l1=0.3), [x.record for x in replies], final)
    assert (answer.record.iteration, answer.iterations, answer.target_met) == (w.selected_iteration, w.iterations,
                                                                               w.target_met)
    with pytest.raises(StepFailed, match="names no probe"):
        remote._answer(Target(max_l1=0.3), [], final)
    assert not remote._keyed  # from now on every request asks for the per-probe responses


def test_the_front_serves_alit_and_karl_through_triton(start_server):
    """ALIT_ENGINE=triton with ALIT_MODELS=alit=...,karl=...: each model's requests go to the Triton model
    of its id and get the in-process answer; a KARL answer's ids and positions reconstruct."""
    import httpx

    from service.engine import Engine, EngineSettings
    from service.model.registry import resolve

    srv = start_server(engine="triton", models=f"alit={FIXTURE / 'checkpoint.pth'},karl=tests/fixtures/karl-reference",
                       model=None, decode_scale=0)
    data = [p.read_bytes() for p in KARL_PHOTOS[2:5]]  # a PNG and two JPEGs
    for name, weights in (("karl", KARL_FIXTURE), ("alit", FIXTURE / "checkpoint.pth")):
        want = in_process([(d, {"MAX_L1": 0.05}, None) for d in data], weights=weights)
        for d, w in zip(data, want):
            r = httpx.post(srv.url + "/v1/tokenize", files={"file": ("a.png", d)},
                           data={"model": name, "max_l1": "0.05"}, timeout=60)
            assert r.status_code == 200, r.text
            res = r.json()["results"][0]
            assert r.json()["model"]["id"] == name and r.json()["model"]["family"] == name and not res["cached"]
            assert res["token_ids"] == w.token_ids.tolist() and res["iterations"] == w.iterations
            assert res["target_met"] == w.target_met and res["l1"] == pytest.approx(w.l1, abs=1e-5)
            if name == "karl":
                assert res["positions"] == w.positions.tolist()
            else:
                assert "positions" not in res

    # /v1/reconstruct of the KARL answer (its ids and positions): the in-process decoder's image
    res = httpx.post(srv.url + "/v1/tokenize", files={"file": ("a.png", data[0])},
                     data={"model": "karl", "max_l1": "0.05"}, timeout=60).json()["results"][0]
    assert res["cached"]
    png = httpx.post(srv.url + "/v1/reconstruct", headers={"Accept": "image/png"}, timeout=60,
                     json={"model": "karl", "token_ids": res["token_ids"], "positions": res["positions"]})
    assert png.status_code == 200, png.text
    got = np.asarray(Image.open(io.BytesIO(png.content)), dtype=np.float64) / 255

    async def decode():
        eng = Engine(resolve(str(KARL_FIXTURE)), EngineSettings(devices="cpu", warmup=False)).start()
        try:
            (pixels,) = await eng.reconstruct([res["token_ids"]], positions=[res["positions"]])
            return pixels
        finally:
            eng.shutdown()

    want = asyncio.run(decode()).clamp(0, 1).permute(1, 2, 0).numpy()
    assert got.shape == (64, 64, 3) and np.abs(got - want).max() <= 1 / 255 + 1e-4


def test_triton_metrics_name_the_model(triton):
    """Each Triton model's engine series carry its `model` label: a KARL and an ALIT image each count
    under their own model; no engine series lacks the label."""
    image = KARL_PHOTOS[0].read_bytes()
    before = triton_metrics(triton.metrics)
    for model in ("karl", "alit"):
        assert not [k for k in infer_many(triton.grpc, [(image, {}, None)], model=model) if k.startswith("error")]
    after = triton_metrics(triton.metrics)
    for model in ("karl", "alit"):
        assert metric(after, "alit_images_total", model=model) - metric(before, "alit_images_total", model=model) == 1
        assert metric(after, "nv_inference_count", model=model) - metric(before, "nv_inference_count", model=model) == 1
        assert metric(after, "alit_worker_healthy", model=model) == 1
    engine_series = [k for k in after if k.startswith("alit_")]
    assert engine_series and all('model="' in k for k in engine_series), [k for k in engine_series if "model=" not in k]


ODP_TARGETS = [{"MAX_L1": 0.4}, {"TOKENS": 24}, {}, {"MAX_L1": 0.3, "MAX_TOKENS": 48}, {"MAX_L1": 0.01}]


def test_the_titok_model_answers_what_the_in_process_engine_does(triton):
    """Triton's `titok` (the One-D-Piece fixture, by ALIT_MODELS): the in-process engine's prefix, with
    one response per probed prefix length (PROBE = the length) — the same code as alit's and karl's."""
    corpus = [p.read_bytes() for p in ODP_PHOTOS]
    requests = [(corpus[i], ODP_TARGETS[i % len(ODP_TARGETS)], None) for i in range(len(corpus))]
    got = infer_many(triton.grpc, requests, all_fields=True, model="titok", every=True)
    assert not [k for k in got if k.startswith("error")], got
    want = in_process(requests, weights=ODP_FIXTURE)
    for n, w in enumerate(want):
        g = got[str(n)]
        np.testing.assert_array_equal(g["TOKEN_IDS"][0], w.token_ids)
        assert g["POSITIONS"][0].size == 0 and w.positions is None
        assert int(g["PROBE"][0, 0]) == w.selected_iteration == int(g["NUM_TOKENS"][0, 0]) == w.num_tokens
        assert int(g["ITERATIONS"][0, 0]) == w.iterations and bool(g["TARGET_MET"][0, 0]) == w.target_met
        assert [int(p["PROBE"][0, 0]) for p in got[f"{n}/probes"]] == [r.iteration for r in w.trajectory]
    assert {int(got[str(n)]["PROBE"][0, 0]) for n in range(len(want))} >= {24, 32, 64}


def test_only_the_served_models_are_loaded(tmp_path):
    """Explicit model control: the ids of ALIT_MODELS, else `alit` alone; an id without a folder is
    named before tritonserver starts."""
    from service.triton_launcher import REPOSITORY, TritonUnavailable, load_flags

    assert load_flags(REPOSITORY, {}) == ["--model-control-mode=explicit", "--load-model=alit"]
    both = load_flags(REPOSITORY, {"ALIT_MODELS": "alit=preset:test_tiny,titok=tests/fixtures/one-d-piece-reference"})
    assert both[1:] == ["--load-model=alit", "--load-model=titok"]
    with pytest.raises(TritonUnavailable, match="'mine'.*no folder"):
        load_flags(REPOSITORY, {"ALIT_MODELS": "alit=preset:test_tiny,mine=preset:test_tiny"})


@pytest.mark.parametrize("name", ["karl", "titok"])
def test_the_other_models_are_the_alit_code_under_another_name(name):
    """model_repository/karl and /titok: each version folder links to alit's code (so there is one
    model.py), and each config declares alit's inputs, outputs and settings, only the name differs."""
    import os
    import re

    repo = ROOT / "model_repository"
    assert (repo / name / "1").is_symlink() and os.readlink(repo / name / "1") == "../alit/1"
    assert (repo / name / "1" / "model.py").read_bytes() == (repo / "alit" / "1" / "model.py").read_bytes()

    def declared(name: str) -> str:
        text = (repo / name / "config.pbtxt").read_text()
        assert f'name: "{name}"' in text
        return "\n".join(re.sub(r"#.*", "", line).rstrip() for line in text.splitlines()
                         if re.sub(r"#.*", "", line).strip() and not line.startswith("name:"))

    assert declared(name) == declared("alit")
    assert "POSITIONS" in declared("alit") and "PROBE" in declared("alit")
