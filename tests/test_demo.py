"""The demo page in real headless Chromium (Debian's), driven by playwright-core, against a real server."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import httpx
import pytest

from conftest import FIXTURE, ROOT

E2E = ROOT / "tests" / "e2e"


TWO_MODELS = "alit=service/weights,karl=tests/fixtures/karl-reference"  # the shipped ALIT + the KARL fixture
IMAGE = FIXTURE / "images/birds/000001.png"


def browser() -> str:
    """node, when the browser test can run here; otherwise a loud skip."""
    node, chromium = shutil.which("node"), shutil.which("chromium")
    if not (node and chromium and (E2E / "node_modules" / "playwright-core").is_dir()):
        pytest.skip("BROWSER TEST NOT RUN: needs node, Debian's chromium and `npm ci` in tests/e2e "
                    "(`make test` installs them when it can)")
    return node


def test_demo_page_updates_token_count_and_images(start_server, tmp_path):
    node = browser()
    from service.settings import DEFAULT_MODEL

    srv = start_server(model=DEFAULT_MODEL)  # the shipped trained model: a meaningful screenshot
    shot = tmp_path / "demo.png"
    out = subprocess.run([node, "demo.mjs", srv.url + "/", str(IMAGE), str(shot)],
                         cwd=E2E, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    first, second, third = r["first"], r["second"], r["third"]
    assert int(first["tokens"]) % 32 == 0 and first["strip"] == int(first["iterations"]) >= 1
    assert first["reconstruction"] == "data:image/png;base64," and first["chosen"] == 1
    assert second["tokens"] == "64" and second["strip"] == 2 and "-F tokens=64" in second["curl"]
    assert "noise.png" in third["curl"] and third["strip"] >= 1
    for state in (first, second, third):  # one model: no picker, no compare view, no model field
        assert state["picker"] is False and state["compare"] is False and "model=" not in state["curl"]
    assert first["kinds"] == ["max_l1", "min_psnr", "tokens", "max_tokens"]  # what the model accepts
    assert (first["title"], first["unit"]) == ("Every iteration", "iterations")
    assert r["external"] == []  # nothing fetched from outside the server: works offline
    assert shot.stat().st_size > 20_000
    if os.environ.get("ALIT_UPDATE_DOCS") == "1":  # refresh the README's screenshot on request only
        shutil.copy(shot, ROOT / "docs" / "demo.png")


def test_demo_page_strips_one_d_piece_prefixes(start_server, tmp_path):
    """One-D-Piece alone: the strip shows the reconstruction at every prefix length the search probed
    (32, then 64 if 32 did not meet the target), an exact budget probes one prefix, and the labels say
    prefixes — from the model's `probe_name` in /v1/models, not from its family's name."""
    node = browser()
    srv = start_server(model="tests/fixtures/one-d-piece-reference", decode_scale=0)
    out = subprocess.run([node, "demo.mjs", srv.url + "/", str(IMAGE), str(tmp_path / "odp.png")],
                         cwd=E2E, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    first, second = r["first"], r["second"]
    with open(IMAGE, "rb") as f:
        expect = httpx.post(srv.url + "/v1/tokenize", files={"file": f}, data={"max_l1": "0.1"}, timeout=60).json()
    n = expect["results"][0]["iterations"]
    assert first["strip"] == int(first["iterations"]) == n and first["tokens"] == str(expect["results"][0]["num_tokens"])
    assert [c.split(" tok")[0] for c in first["captions"]] == [str(32 * (i + 1)) for i in range(n)]
    assert (first["title"], first["unit"]) == ("Every prefix", "prefixes") and first["chosen"] == 1
    assert second["tokens"] == "64" and second["strip"] == 1 and second["captions"][0].startswith("64 tok")
    assert first["reconstruction"] == "data:image/png;base64," and r["external"] == []


def test_demo_page_picks_and_compares_models(start_server, tmp_path):
    """Two models served: the picker lists both, each offers only the targets it accepts, one model
    streams (KARL's passes), compare shows one card per model with what POST /v1/tokenize answers for
    the same image and target, and API errors (422 for a target one model does not take, 404 for a
    model the server does not serve) appear as their messages."""
    node = browser()
    srv = start_server(models=TWO_MODELS, decode_scale=0)
    shot = tmp_path / "demo_compare.png"
    out = subprocess.run([node, "compare.mjs", srv.url + "/", str(IMAGE), str(shot)],
                         cwd=E2E, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])

    def api(model: str, target: dict) -> dict:
        with open(IMAGE, "rb") as f:
            resp = httpx.post(srv.url + "/v1/tokenize", files={"file": f}, data={"model": model, **target}, timeout=120)
        assert resp.status_code == 200, resp.text
        return resp.json()["results"][0]

    picker = r["picker"]
    assert picker["visible"] and picker["options"] == ["alit", "karl"] and picker["selected"] == "alit"
    assert "(default)" in picker["labels"][0] and "accepts max_l1, min_psnr, tokens, max_tokens" in picker["info"]
    assert r["offered"] == {"alit": ["max_l1", "min_psnr", "tokens", "max_tokens"], "karl": ["max_l1", "max_tokens"],
                            "compare": ["max_l1", "max_tokens"]}

    karl = r["karl"]  # KARL alone, streamed: its result, its passes, its reconstruction (ids with positions)
    assert karl["target"] == {"max_l1": 0.1} and "-F model=karl -F max_l1=0.1" in karl["curl"]
    expect = api("karl", karl["target"])
    assert karl["tokens"] == str(expect["num_tokens"]) and karl["iterations"] == str(expect["iterations"])
    assert karl["unit"] == "passes" and karl["strip"] >= 1 and karl["chosen"] == 1
    assert karl["reconstruction"] == "data:image/png;base64,"

    for name, target in (("first", {"max_l1": 0.1}), ("second", {"max_tokens": 64})):
        state = r[name]
        assert state["target"] == target and state["visible"] and state["pickerDisabled"], state
        assert state["status"].startswith("Done: 2 models") and not state["statusError"]
        assert [c["model"] for c in state["cards"]] == ["alit", "karl"]
        assert state["curl"].count("\n") == 1 and "-F model=alit" in state["curl"] and "-F model=karl" in state["curl"]
        for card in state["cards"]:  # each card: what the API answers that model for this image and target
            expect = api(card["model"], target)
            assert card["tokens"] == str(expect["num_tokens"]), (name, card, expect["num_tokens"])
            assert card["iterations"] == str(expect["iterations"])
            assert card["met"] == ("yes" if expect["target_met"] else "no")
            assert card["l1"] == f"{expect['l1']:.3f}"
            assert card["reconstruction"] == "data:image/png;base64," and card["error"] == ""
        assert [c["unit"] for c in state["cards"]] == ["iterations", "passes"]
    assert r["second"]["cards"][0]["tokens"] == "64"  # ALIT at its cap

    mixed = r["mixed"]  # min_psnr: ALIT's result beside KARL's 422 message
    assert mixed["statusError"] and "karl" in mixed["status"]
    alit_card, karl_card = mixed["cards"]
    assert alit_card["tokens"] == str(api("alit", {"min_psnr": 22})["num_tokens"]) and alit_card["error"] == ""
    assert karl_card["error"].startswith("422 invalid_target: min_psnr")
    assert "accepts max_l1, max_tokens" in karl_card["error"]
    assert karl_card["tokens"] == "–" and karl_card["reconstruction"] == ""

    assert r["missing"].startswith("404 model_not_found") and "'ghost' is not served here" in r["missing"]
    ghost = {c["model"]: c for c in r["ghost"]["cards"]}
    assert ghost["ghost"]["error"].startswith("404 model_not_found") and ghost["karl"]["error"] == ""
    assert ghost["alit"]["tokens"] == r["first"]["cards"][0]["tokens"]

    assert r["external"] == []
    assert shot.stat().st_size > 20_000
    if os.environ.get("ALIT_UPDATE_DOCS") == "1":  # the README's compare screenshot, on request only
        shutil.copy(shot, ROOT / "docs" / "demo_compare.png")


def test_demo_page_is_self_contained_and_can_be_turned_off(start_server):
    srv = start_server()
    html = httpx.get(srv.url + "/").text
    assert "<script>" in html and not re.search(r"(src|href)=\"https?://", html)
    assert len(httpx.get(srv.url + "/demo/samples").json()) == 9
    assert httpx.get(srv.url + "/demo/samples/noise.png").headers["content-type"] == "image/png"
    assert httpx.get(srv.url + "/demo/samples/..%2Fapp.py").status_code == 404
    off = start_server(demo_page="false")
    assert httpx.get(off.url + "/").status_code == 404


def test_demo_page_respects_api_keys(start_server):
    srv = start_server(api_keys="k")
    assert httpx.get(srv.url + "/").status_code == 200  # the page itself is static
    assert httpx.get(srv.url + "/v1/models").status_code == 401  # its API calls need the key
    assert httpx.get(srv.url + "/v1/models", headers={"Authorization": "Bearer k"}).status_code == 200
