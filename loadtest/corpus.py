"""Images of varied complexity for load tests and benchmarks: the held-out photos, crops of them at
several scales, flat colours and noise. Built from the fixture photos; nothing downloaded."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "alit-reference" / "images"


def photos() -> list[tuple[str, Image.Image]]:
    return [(p.name, Image.open(p).convert("RGB")) for p in sorted(PHOTOS.rglob("*")) if p.is_file()]


def random_crop(img: Image.Image, rng: random.Random) -> Image.Image:
    w, h = img.size
    s = int(min(w, h) * rng.uniform(0.25, 0.8))
    x, y = rng.randint(0, w - s), rng.randint(0, h - s)
    return img.crop((x, y, x + s, y + s))


def corpus(n_crops: int = 24, seed: int = 0) -> list[tuple[str, Image.Image]]:
    rng = random.Random(seed)
    base = photos()
    out = list(base)
    for i in range(n_crops):
        name, img = base[i % len(base)]
        out.append((f"{name}@crop{i}", random_crop(img, rng)))
    for c in [(51, 102, 204), (230, 230, 217), (26, 26, 26)]:
        out.append((f"flat{c}", Image.new("RGB", (96, 96), c)))
    nrng = np.random.default_rng(seed)
    for sigma in (0.1, 0.3):
        arr = (0.5 + sigma * nrng.standard_normal((96, 96, 3))).clip(0, 1)
        out.append((f"noise{sigma}", Image.fromarray((arr * 255).astype(np.uint8))))
    return out


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()
