"""Several models in one server (ALIT_MODELS): the shipped ALIT default beside the KARL golden fixture,
through a real uvicorn server and real Redis; and two in-process engines side by side."""

from __future__ import annotations

import asyncio
import io
import threading

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from service.cache import Trajectory
from service.engine import Engine, EngineSettings, StepFailed, Target
from service.imaging import load_for_model
from service.model.registry import resolve

KARL = ROOT / "tests" / "fixtures" / "karl-reference"
ALIT = ROOT / "service" / "weights"  # the shipped default, as `make serve` serves it
QUALITIES = [0.0, 0.02, 0.05, 0.1, 0.2, 0.5]  # the fixture's axes (expected.npz `qualities`, `token_budgets`)
BUDGETS = [16, 32, 128, 256, 512]


@pytest.fixture(scope="module")
def karl_expected() -> dict[str, np.ndarray]:
    with np.load(KARL / "expected.npz") as f:
        return {k: f[k] for k in f.files}


def karl_pass(exp, b: int, budget: int, q: float) -> tuple[list[int], list[int], float]:
    """The fixture's answer for image b at (budget, quality): kept ids, their positions, L1."""
    p = f"T{budget:03d}_q{round(q * 1000):03d}"
    kept = ~exp[p + "_halted"][b]
    l1 = float(exp["l1"][QUALITIES.index(q), BUDGETS.index(budget), b])
    return exp[p + "_latent_ids"][b][kept].tolist(), np.flatnonzero(kept).tolist(), l1


def images(exp) -> list[bytes]:
    return [(KARL / "images" / name).read_bytes() for name in exp["image_names"]]


def tokenize(url: str, data: bytes, **fields) -> httpx.Response:
    return httpx.post(url + "/v1/tokenize", files={"file": ("img.png", data)},
                      data={k: str(v) for k, v in fields.items()}, timeout=60)


def test_alit_and_karl_in_one_server(start_server, shared_redis_url, cache_prefix, karl_expected):
    exp = karl_expected
    srv = start_server(models=f"alit={ALIT},karl={KARL}", model=None, decode_scale=0, redis_url=shared_redis_url,
                       cache_prefix=cache_prefix)
    models = httpx.get(srv.url + "/v1/models").json()["data"]
    assert [(m["id"], m["family"], m["default"]) for m in models] == [("alit", "alit", True), ("karl", "karl", False)]
    assert models[1]["accepts"] == ["max_l1", "max_tokens"] and models[1]["token_positions"]
    assert models[0]["halting"] is True and models[1]["halting"] is None  # ALIT_HALTING is ALIT's alone

    alit = resolve(str(ALIT))
    alit_engine = Engine(alit, EngineSettings(devices="cpu", warmup=False)).start()
    try:
        for b, data in enumerate(images(exp)):
            # KARL, a quality target: the fixture's single pass at the default budget (256) and its bin
            for q, budget in ((0.05, None), (0.1, 128)):
                fields = {"model": "karl", "max_l1": q, **({"max_tokens": budget} if budget else {})}
                ids, pos, l1 = karl_pass(exp, b, budget or 256, q)
                r = tokenize(srv.url, data, **fields)
                assert r.status_code == 200, r.text
                res = r.json()["results"][0]
                assert r.json()["model"]["id"] == "karl" and not res["cached"]
                assert res["token_ids"] == ids and res["positions"] == pos and res["num_tokens"] == len(ids)
                assert res["l1"] == pytest.approx(l1, abs=1e-4) and res["iterations"] == 1
                assert res["target_met"] == (res["l1"] <= q)  # measured, not KARL's prediction
                again = tokenize(srv.url, data, **fields).json()["results"][0]
                assert again["cached"] and again["token_ids"] == ids and again["positions"] == pos
            # the same image with the default model (ALIT): ALIT's tokens, not a hit on KARL's record
            r = tokenize(srv.url, data, max_l1=0.05)
            res = r.json()["results"][0]
            assert r.json()["model"]["family"] == "alit" and not res["cached"] and "positions" not in res
            want = asyncio.run(alit_engine.tokenize(load_for_model(data, 64), Target(max_l1=0.05)))
            assert res["token_ids"] == want.token_ids.tolist() and res["iterations"] == want.iterations
            assert tokenize(srv.url, data, model="alit", max_l1=0.05).json()["results"][0]["cached"]
    finally:
        alit_engine.shutdown()

    # /v1/reconstruct of what /v1/tokenize returned: the fixture's reconstruction, for every pass it
    # stores (quality 0 is bin 0, which max_l1 0.004 selects too)
    for name, fields in (("T256_q050_recon", {"max_l1": 0.05}), ("T016_q500_recon", {"max_l1": 0.5, "max_tokens": 16}),
                         ("T512_q000_recon", {"max_l1": 0.004, "max_tokens": 512})):
        for b, data in enumerate(images(exp)):
            res = tokenize(srv.url, data, model="karl", **fields).json()["results"][0]
            png = httpx.post(srv.url + "/v1/reconstruct", headers={"Accept": "image/png"}, timeout=60,
                             json={"model": "karl", "token_ids": res["token_ids"], "positions": res["positions"]})
            assert png.status_code == 200, png.text
            got = np.asarray(Image.open(io.BytesIO(png.content)), dtype=np.float64) / 255
            want = np.clip(exp[name][b].transpose(1, 2, 0), 0, 1)
            assert np.abs(got - want).max() <= 1 / 255 + 1e-4, (name, b)
    data = images(exp)[0]
    res = tokenize(srv.url, data, model="karl", max_l1=0.05).json()["results"][0]
    want = np.clip(exp["T256_q050_recon"][0].transpose(1, 2, 0), 0, 1)
    # without the positions it is another image (KARL halts tokens anywhere, not a suffix)
    plain = httpx.post(srv.url + "/v1/reconstruct", headers={"Accept": "image/png"}, timeout=60,
                       json={"model": "karl", "token_ids": res["token_ids"]})
    assert np.abs(np.asarray(Image.open(io.BytesIO(plain.content)), dtype=np.float64) / 255 - want).max() > 0.01

    # what each model cannot do is a clear 4xx naming what it accepts / serves
    e = tokenize(srv.url, data, model="nope")
    assert e.status_code == 404 and e.json()["error"]["code"] == "model_not_found"
    assert e.json()["error"]["detail"]["served"] == ["alit", "karl"]
    for bad, field in (({"min_psnr": 25}, "min_psnr"), ({"tokens": 64}, "tokens"), ({"max_tokens": 600}, "max_tokens")):
        e = tokenize(srv.url, data, model="karl", **bad)
        assert e.status_code == 422 and e.json()["error"]["detail"]["field"] == field, e.text
    assert "max_l1, max_tokens" in tokenize(srv.url, data, model="karl", min_psnr=25).json()["error"]["message"]
    e = httpx.post(srv.url + "/v1/reconstruct", json={"token_ids": list(range(32)), "positions": list(range(32))})
    assert e.status_code == 422 and e.json()["error"]["detail"]["field"] == "positions"  # ALIT's carry none
    e = httpx.post(srv.url + "/v1/reconstruct", json={"model": "karl", "token_ids": [1, 2], "positions": [5, 3]})
    assert e.status_code == 422 and e.json()["error"]["detail"]["field"] == "positions"

    # one series per model
    assert srv.metric("alit_images_total", model="karl") >= 14 and srv.metric("alit_images_total", model="alit") >= 7
    assert httpx.get(srv.url + "/readyz").json()["models"][1]["id"] == "karl"


def test_two_engines_run_at_once_each_batching_its_own_model(karl_expected):
    """ALIT and KARL engines on one device: both hold images at the same time, every model call holds
    one model's images only, and a KARL step that fails does not touch the ALIT requests."""
    alit, karl = resolve(str(ALIT)), resolve(str(KARL))
    pixels = torch.from_numpy(karl_expected["input"])
    engines = {name: Engine(lm, EngineSettings(devices="cpu", max_batch=4, warmup=False)).start()
               for name, lm in (("alit", alit), ("karl", karl))}
    calls: list[tuple[str, set[str], bool]] = []
    lock = threading.Lock()

    def hook(model: str):
        def check(jobs) -> None:
            with lock:
                calls.append((model, {j.tag for j in jobs}, engines["alit"].busy))
            if model == "karl" and any(j.tag == "karl-fail" for j in jobs):
                raise RuntimeError("injected KARL failure")
        return check

    for name, e in engines.items():
        e.set_fault_hook(hook(name))

    async def run():
        alit_jobs = [engines["alit"].tokenize(p, Target(max_l1=1e-6), tag="alit") for p in pixels]  # every iteration
        karl_jobs = [engines["karl"].tokenize(p, Target(max_l1=0.05), tag="karl") for p in pixels[:3]]
        failing = [engines["karl"].tokenize(p, Target(max_l1=0.05), tag="karl-fail") for p in pixels[3:]]
        return await asyncio.gather(asyncio.gather(*alit_jobs), asyncio.gather(*karl_jobs),
                                    asyncio.gather(*failing, return_exceptions=True))

    try:
        alit_res, karl_res, failed = asyncio.run(run())
    finally:
        for e in engines.values():
            e.shutdown()
    assert all(isinstance(f, StepFailed) for f in failed)
    assert [r.iterations for r in alit_res] == [8] * 7
    for b, r in enumerate(karl_res):
        ids, pos, _ = karl_pass(karl_expected, b, 256, 0.05)
        assert r.token_ids.tolist() == ids and r.positions.tolist() == pos
    # each call held one model's images only; KARL calls ran while the ALIT engine held work
    assert all(tags <= ({"alit"} if m == "alit" else {"karl", "karl-fail"}) for m, tags, _ in calls)
    assert any(m == "karl" and alit_busy for m, _, alit_busy in calls)
    # ALIT answers did not depend on the other engine: the same as alone
    alone = Engine(alit, EngineSettings(devices="cpu", warmup=False)).start()
    try:
        again = asyncio.run(alone.tokenize(pixels[0], Target(max_l1=1e-6)))
    finally:
        alone.shutdown()
    assert np.array_equal(again.token_ids, alit_res[0].token_ids)


def test_karl_stricter_retries_are_cached_and_answer_looser_targets(karl_expected):
    """With retry_stricter, a missed quality runs again at the next stricter bin; the stored passes
    answer any target whose ladder they cover, by the engine's own rule."""
    karl = resolve(str(KARL))
    karl.model.retry_stricter = True
    limits = karl.limits
    engine = Engine(karl, EngineSettings(devices="cpu", warmup=False)).start()
    image = torch.from_numpy(karl_expected["input"][0])
    try:
        r = asyncio.run(engine.tokenize(image, Target(max_l1=0.05), trajectory=True))
    finally:
        engine.shutdown()
    # random weights never reach 0.05: bins 0.05, 0.04, ..., 0.005 were all tried, the best returned
    assert not r.target_met and r.iterations == 6 and len(r.trajectory) == 6
    assert r.l1 == min(t.l1 for t in r.trajectory)
    stored = Trajectory().merge(r.trajectory)
    stored = Trajectory.from_bytes(stored.to_bytes())  # through the cache's format, positions included
    for target in (Target(max_l1=0.05), Target(max_l1=0.03), Target(max_l1=0.02)):
        hit = stored.lookup(target, limits)
        assert hit is not None
        engine = Engine(karl, EngineSettings(devices="cpu", warmup=False)).start()
        try:
            fresh = asyncio.run(engine.tokenize(image, target))
        finally:
            engine.shutdown()
        assert np.array_equal(hit.record.token_ids, fresh.token_ids)
        assert np.array_equal(hit.record.positions, fresh.positions) and hit.iterations == fresh.iterations
    assert stored.lookup(Target(max_l1=0.1), limits) is None  # bin 0.1 never ran: a miss, not a wrong answer
