"""Image folders for the saturation and bulk benchmarks, made here from what is installed (nothing
downloaded), the same bytes every time:

    python loadtest/make_folders.py runs/folders

- `skimage/`: the 2D sample images of scikit-image's `skimage.data`, as PNGs (photographs and
  microscopy: a folder the engine has never seen);
- `synthetic/`: flat colours, noise at several strengths, gradients, checkerboards, stripes, random
  rectangles and a few photo crops: heavy with the flat, noisy and synthetic images that halt at
  the extremes;
- `bulk/`: 400 images for `tokenize-dataset`: crops of the two above at many sizes (24 to 900 px a
  side, non-square too), as JPEG, PNG, WebP, BMP and GIF, in nested folders, plus 5 corrupt files
  (random bytes, truncated JPEG and PNG, an empty file, a text file named .jpg);
- `bulk_big/`: the same recipe ten times over (4000 images), for resident memory at two sizes;
- `gpu/` (only with `--gpu N`): N images of the same recipe at 128 to 512 px a side, as JPEG and
  WebP alone, plus the 5 corrupt files: small enough (about 10 KB an image) to travel to a GPU
  machine by the thousand.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def _skimage() -> list[tuple[str, Image.Image]]:
    import skimage.data as data

    out = []
    for name in sorted(dir(data)):
        if name.startswith("_") or name in ("download_all", "lbp_frontal_face_cascade_filename", "data_dir"):
            continue
        fn = getattr(data, name)
        if not callable(fn):
            continue
        try:
            arr = np.asarray(fn())
        except Exception:  # noqa: BLE001 - images that need a download or are not images
            continue
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, -1)
        if arr.ndim != 3 or arr.shape[-1] not in (3, 4) or min(arr.shape[:2]) < 32:
            continue
        if arr.dtype != np.uint8:
            a = arr.astype(np.float64)
            arr = ((a - a.min()) / max(1e-9, a.max() - a.min()) * 255).astype(np.uint8)
        out.append((name, Image.fromarray(arr[..., :3])))
    return out


def _synthetic(rng: np.random.Generator, photos: list[Image.Image]) -> list[tuple[str, Image.Image]]:
    out = []
    for i in range(6):
        out.append((f"flat{i}", Image.new("RGB", (128 + 16 * i, 128), tuple(int(c) for c in rng.integers(0, 256, 3)))))
    for i, sigma in enumerate((0.02, 0.05, 0.1, 0.2, 0.3, 0.5)):
        arr = (0.5 + sigma * rng.standard_normal((160, 160, 3))).clip(0, 1)
        out.append((f"noise{i}", Image.fromarray((arr * 255).astype(np.uint8))))
    y, x = np.mgrid[0:192, 0:192] / 191
    for i in range(4):
        c0, c1 = rng.random(3), rng.random(3)
        t = [x, y, (x + y) / 2, np.hypot(x - 0.5, y - 0.5)][i][..., None]
        out.append((f"gradient{i}", Image.fromarray(((c0 * (1 - t) + c1 * t) * 255).astype(np.uint8))))
    for i, n in enumerate((2, 4, 8, 16, 32)):
        board = ((np.indices((192, 192)) // (192 // n)).sum(0) % 2 * 255).astype(np.uint8)
        out.append((f"checker{n}", Image.fromarray(np.stack([board] * 3, -1))))
        stripes = ((np.arange(192) // max(1, 96 // n) % 2) * 255).astype(np.uint8)
        out.append((f"stripes{n}", Image.fromarray(np.stack([np.broadcast_to(stripes, (192, 192))] * 3, -1).copy())))
    for i in range(6):
        arr = np.full((192, 192, 3), rng.integers(0, 256, 3), np.uint8)
        for _ in range(12):
            x0, y0 = rng.integers(0, 160, 2)
            w, h = rng.integers(8, 80, 2)
            arr[y0:y0 + h, x0:x0 + w] = rng.integers(0, 256, 3)
        out.append((f"rects{i}", Image.fromarray(arr)))
    for i, img in enumerate(photos[:8]):
        w, h = img.size
        s = min(w, h) // 2
        out.append((f"crop{i}", img.crop((w // 4, h // 4, w // 4 + s, h // 4 + s))))
    return out


FORMATS = (("jpg", "JPEG", {"quality": 88}), ("png", "PNG", {}), ("webp", "WEBP", {"quality": 85}),
           ("bmp", "BMP", {}), ("gif", "GIF", {}))


def _encode(img: Image.Image, fmt: str, kw: dict) -> bytes:
    buf = io.BytesIO()
    (img.convert("P") if fmt == "GIF" else img).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _bulk(folder: Path, pool: list[Image.Image], n: int, rng: np.random.Generator,
          sides: tuple[int, int] = (24, 900), formats: tuple = FORMATS) -> None:
    for i in range(n):
        img = pool[int(rng.integers(len(pool)))]
        w, h = img.size
        side = int(rng.integers(sides[0], sides[1] + 1))
        aspect = float(rng.choice([1.0, 1.0, 0.75, 1.33, 0.5, 2.0]))
        cw, ch = max(8, min(w, int(side * aspect))), max(8, min(h, side))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = img.crop((x0, y0, x0 + cw, y0 + ch))
        if side > max(cw, ch):  # small sources: scale up to the drawn size
            crop = crop.resize((max(8, int(side * aspect)), side), Image.Resampling.BICUBIC)
        ext, fmt, kw = formats[i % len(formats)]
        sub = folder / f"part{i % 7}" / f"set{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"img{i:05d}.{ext}").write_bytes(_encode(crop, fmt, kw))
    good = (folder / "part0" / "set0" / "img00000.jpg").read_bytes()
    found = next(folder.rglob("*.png"), None)  # gpu/ holds no PNG: encode one
    png = found.read_bytes() if found else _encode(pool[0], "PNG", {})
    bad = folder / "corrupt"
    bad.mkdir(exist_ok=True)
    (bad / "random.png").write_bytes(rng.bytes(2048))
    (bad / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (bad / "truncated.png").write_bytes(png[: len(png) * 2 // 3])
    (bad / "empty.webp").write_bytes(b"")
    (bad / "notes.jpg").write_bytes(b"this is not an image\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--bulk", type=int, default=400, help="images in bulk/ (bulk_big/: ten times as many; 0: neither)")
    p.add_argument("--gpu", type=int, default=0, help="also gpu/ with this many small JPEG/WebP images")
    a = p.parse_args(argv)
    out = Path(a.out)
    rng = np.random.default_rng(2026)
    sk = _skimage()
    if not sk:
        print("scikit-image has no sample images here", file=sys.stderr)
        return 2
    (out / "skimage").mkdir(parents=True, exist_ok=True)
    for name, img in sk:
        img.save(out / "skimage" / f"{name}.png")
    syn = _synthetic(rng, [img for _, img in sk])
    (out / "synthetic").mkdir(parents=True, exist_ok=True)
    for name, img in syn:
        img.save(out / "synthetic" / f"{name}.png")
    pool = [img for _, img in sk + syn]
    if a.bulk:
        _bulk(out / "bulk", pool, a.bulk, rng)
        _bulk(out / "bulk_big", pool, 10 * a.bulk, rng)
    if a.gpu:
        _bulk(out / "gpu", pool, a.gpu, np.random.default_rng(2027), sides=(128, 512),
              formats=(FORMATS[0], FORMATS[2]))
    print(f"{out}: skimage {len(sk)}, synthetic {len(syn)}"
          + (f", bulk {a.bulk} + 5 corrupt, bulk_big {10 * a.bulk} + 5" if a.bulk else "")
          + (f", gpu {a.gpu} + 5" if a.gpu else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
