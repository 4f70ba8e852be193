"""One-D-Piece (the `titok` family) served beside ALIT over HTTP: the shortest prefix on the ladder
whose reconstruction meets the target, exact prefix budgets, the cache, and the reference's bilinear
preprocessing — against the One-D-Piece golden fixture."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from service.imaging import load_for_model

ODP = ROOT / "tests" / "fixtures" / "one-d-piece-reference"
ALIT = ROOT / "service" / "weights"
LADDER = [32, 64]  # the fixture's model: N = 64 latent tokens, the default ladder step 32


@pytest.fixture(scope="module")
def exp() -> dict[str, np.ndarray]:
    with np.load(ODP / "expected.npz") as f:
        return {k: f[k] for k in f.files}


def answer(l1: np.ndarray, q: float) -> tuple[int, bool]:
    """The documented answer from the fixture's per-length L1 table: the first ladder length whose
    L1 meets q, else the lowest-L1 one (earliest on ties) with target_met false."""
    for k in LADDER:
        if l1[k - 1] <= q:
            return k, True
    return min(LADDER, key=lambda k: l1[k - 1]), False


def tokenize(url: str, data: bytes, **fields) -> dict:
    r = httpx.post(url + "/v1/tokenize", files={"file": ("img.png", data)},
                   data={"model": "titok", **{k: str(v) for k, v in fields.items()}}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["results"][0]


def test_bilinear_preprocessing_gives_the_fixture_input(exp):
    for b, name in enumerate(exp["image_names"]):
        pixels = load_for_model((ODP / "images" / name).read_bytes(), 64, resample="bilinear")
        assert np.array_equal(pixels.numpy(), exp["input"][b]), name


def test_one_d_piece_prefix_search_over_http(start_server, exp):
    srv = start_server(models=f"alit={ALIT},titok={ODP}", model=None, decode_scale=0)
    info = httpx.get(srv.url + "/v1/models").json()["data"][1]
    assert (info["family"], info["num_latent_tokens"], info["ladder_step"]) == ("titok", 64, 32)
    for b, name in enumerate(exp["image_names"]):
        data = (ODP / "images" / name).read_bytes()
        l1 = exp["l1"][:, b]
        assert abs(l1[31] - l1[63]) > 1e-4  # the answers below are not decided by float noise
        for q in (min(l1[31], l1[63]) + 5e-5, 0.01):
            k, met = answer(l1, q)
            res = tokenize(srv.url, data, max_l1=q)
            assert (res["num_tokens"], res["target_met"]) == (k, met), (name, q)
            assert res["token_ids"] == exp["token_ids"][b][:k].tolist() and "positions" not in res
            assert res["l1"] == pytest.approx(l1[k - 1], abs=1e-5)
            assert tokenize(srv.url, data, max_l1=q)["cached"]
        looser = tokenize(srv.url, data, max_l1=0.99)  # the stored prefixes answer it
        assert looser["cached"] and looser["num_tokens"] == 32
        # an exact budget decodes exactly k tokens, any k the model allows: the fixture's reconstruction
        for k in (1, 8, 24, 64):
            res = tokenize(srv.url, data, tokens=k, include_reconstruction="true")
            assert res["token_ids"] == exp["token_ids"][b][:k].tolist()
            assert res["l1"] is None or res["l1"] == pytest.approx(l1[k - 1], abs=1e-5)  # measured when cached
            got = np.asarray(Image.open(io.BytesIO(base64.b64decode(res["reconstruction_png"]))), np.float64) / 255
            i = list(exp["ladder_lengths"]).index(k)
            want = np.clip(exp["recon"][i, b].transpose(1, 2, 0), 0, 1)
            assert np.abs(got - want).max() <= 1 / 255 + 1e-4, (name, k)
    bad = httpx.post(srv.url + "/v1/tokenize", files={"file": ("a.png", data)}, data={"model": "titok", "tokens": 65})
    assert bad.status_code == 422 and bad.json()["error"]["detail"]["field"] == "tokens"
    assert srv.metric("alit_images_total", model="titok") > 0
