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


def test_demo_page_updates_token_count_and_images(start_server, tmp_path):
    node, chromium = shutil.which("node"), shutil.which("chromium")
    if not (node and chromium and (E2E / "node_modules" / "playwright-core").is_dir()):
        pytest.skip("BROWSER TEST NOT RUN: needs node, Debian's chromium and `npm ci` in tests/e2e "
                    "(`make test` installs them when it can)")
    from service.settings import DEFAULT_MODEL

    srv = start_server(model=DEFAULT_MODEL)  # the shipped trained model: a meaningful screenshot
    shot = tmp_path / "demo.png"
    out = subprocess.run([node, "demo.mjs", srv.url + "/", str(FIXTURE / "images/birds/000001.png"), str(shot)],
                         cwd=E2E, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    first, second, third = r["first"], r["second"], r["third"]
    assert int(first["tokens"]) % 32 == 0 and first["strip"] == int(first["iterations"]) >= 1
    assert first["reconstruction"] == "data:image/png;base64," and first["chosen"] == 1
    assert second["tokens"] == "64" and second["strip"] == 2 and "-F tokens=64" in second["curl"]
    assert "noise.png" in third["curl"] and third["strip"] >= 1
    assert r["external"] == []  # nothing fetched from outside the server: works offline
    assert shot.stat().st_size > 20_000
    if os.environ.get("ALIT_UPDATE_DOCS") == "1":  # refresh the README's screenshot on request only
        shutil.copy(shot, ROOT / "docs" / "demo.png")


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
