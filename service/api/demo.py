"""The demo page at `/` (static HTML + JS, no build step, no CDN) and its sample images.

Samples: the 7 held-out photos shipped with the reference repository's assets (COCO val2017 and
bird photos, see tests/fixtures/alit-reference/README.md), plus a flat and a noise image made here.
Turned off with ALIT_DEMO_PAGE=false.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse, Response
from PIL import Image

STATIC = Path(__file__).parent / "static"
SAMPLES = STATIC / "samples"
GENERATED = ("flat.png", "noise.png")

router = APIRouter(include_in_schema=False)


def _generated(name: str) -> bytes:
    if name == "flat.png":
        img = Image.new("RGB", (256, 256), (96, 140, 190))
    else:
        rng = np.random.default_rng(0)
        img = Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@router.get("/")
async def page():
    return FileResponse(STATIC / "index.html", media_type="text/html")


@router.get("/demo/samples")
async def samples():
    names = sorted(p.name for p in SAMPLES.iterdir() if p.is_file()) + list(GENERATED)
    return [{"name": n, "url": f"/demo/samples/{n}"} for n in names]


@router.get("/demo/samples/{name}")
async def sample(name: str):
    if name in GENERATED:
        return Response(_generated(name), media_type="image/png")
    path = SAMPLES / name
    if "/" in name or not path.is_file():
        raise HTTPException(404, f"no sample named {name!r}")
    return FileResponse(path)
