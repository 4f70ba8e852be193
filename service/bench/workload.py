"""The benchmark's workload, built from a folder of images: the images, crops of them at several
scales, flat colours and noise; quality targets calibrated on the model being measured, so halting
iterations spread whatever the model; and, per request, the iteration the model halts at."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..engine import Target
from ..engine.records import IterationRecord
from ..imaging import preprocess
from ..model.alit import ALIT, ALITLimits
from ..model.measure import iterate_and_measure

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class WorkloadError(ValueError):
    """The benchmark's images cannot be used (the message says which and why)."""


def load_folder(folder: str | Path) -> list[tuple[str, Image.Image]]:
    """Every image file under `folder` (recursively), as RGB."""
    if not Path(folder).is_dir():
        raise WorkloadError(f"--images {folder}: no such folder")
    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise WorkloadError(f"--images {folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in it")
    out = []
    for p in paths:
        try:
            with Image.open(p) as im:
                out.append((str(p.relative_to(folder)), im.convert("RGB")))
        except (OSError, Image.DecompressionBombError) as e:
            raise WorkloadError(f"--images {folder}: {p} is not an image this benchmark can read ({e})") from e
    return out


def random_crop(img: Image.Image, rng: random.Random) -> Image.Image:
    """A square crop of 25-80 % of the short side, anywhere in the image."""
    w, h = img.size
    s = max(8, int(min(w, h) * rng.uniform(0.25, 0.8)))
    x, y = rng.randint(0, w - s), rng.randint(0, h - s)
    return img.crop((x, y, x + s, y + s))


def corpus(photos: list[tuple[str, Image.Image]], n_crops: int = 24, seed: int = 0) -> list[tuple[str, Image.Image]]:
    """The photos, `n_crops` square crops of them (25-80 % of the short side), three flat colours
    and two noise images: easy, medium and hard images for an adaptive tokenizer."""
    rng = random.Random(seed)
    out = list(photos)
    for i in range(n_crops):
        name, img = photos[i % len(photos)]
        out.append((f"{name}@crop{i}", random_crop(img, rng)))
    for c in [(51, 102, 204), (230, 230, 217), (26, 26, 26)]:
        out.append((f"flat{c}", Image.new("RGB", (96, 96), c)))
    nrng = np.random.default_rng(seed)
    for sigma in (0.1, 0.3):
        arr = (0.5 + sigma * nrng.standard_normal((96, 96, 3))).clip(0, 1)
        out.append((f"noise{sigma}", Image.fromarray((arr * 255).astype(np.uint8))))
    return out


def measure_iterations(model: ALIT, images: torch.Tensor, halting: bool,
                       batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Every iteration of every image, measured: (L1, PSNR), each (max_iters, n)."""
    l1s, psnrs = [], []
    with torch.inference_mode():
        for i in range(0, images.shape[0], batch):
            rows = list(iterate_and_measure(model, images[i : i + batch].to(model.device), halting=halting))
            l1s.append(np.stack([r.l1.cpu().numpy() for r in rows]))
            psnrs.append(np.stack([r.psnr.cpu().numpy() for r in rows]))
    return np.concatenate(l1s, axis=1), np.concatenate(psnrs, axis=1)


def calibrate_targets(l1: np.ndarray, psnr: np.ndarray, limits: ALITLimits) -> list[Target]:
    """Three L1 levels (the median image's L1 after 2, 4 and 6 iterations), one PSNR level (after 4)
    and three exact budgets (2, 4 and every iteration's tokens)."""
    k, t = limits.max_iters, limits.tokens_per_iter
    levels = [float(np.quantile(l1[min(i, k - 1)], 0.5)) for i in (1, 3, 5)]
    psnr_level = float(np.quantile(psnr[min(3, k - 1)], 0.5))
    return [Target(max_l1=levels[0]), Target(max_l1=levels[1]), Target(max_l1=levels[2]),
            Target(min_psnr=psnr_level), Target(tokens=2 * t), Target(tokens=4 * t), Target(tokens=k * t)]


@dataclass(frozen=True)
class Request:
    image: int  # index into the corpus
    target: Target
    halts_at: int  # iterations the engine runs for it (from the measured iterations)
    target_met: bool


def halting_plan(l1: np.ndarray, psnr: np.ndarray, image: int, target: Target, limits: ALITLimits) -> tuple[int, bool]:
    """Where `target` halts on image `image`, by the engine's own rule (`Target.select`)."""
    records = {n + 1: IterationRecord(n + 1, np.zeros(0, np.int32), float(l1[n, image]), float(psnr[n, image]))
               for n in range(l1.shape[0])}
    sel = target.select(records, limits)
    assert sel is not None
    return sel.iterations, sel.target_met


def requests(n: int, n_images: int, targets: list[Target], l1: np.ndarray, psnr: np.ndarray,
             limits: ALITLimits, seed: int) -> list[Request]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        i, t = rng.randrange(n_images), rng.choice(targets)
        out.append(Request(i, t, *halting_plan(l1, psnr, i, t, limits)))
    return out


def poisson(rate: float, n: int, seed: int) -> list[float]:
    """Arrival times (s) of n requests at `rate` per second, Poisson."""
    rng = np.random.default_rng(seed)
    return list(np.cumsum(rng.exponential(1.0 / rate, size=n)))


def tensors(images: list[tuple[str, Image.Image]], size: int) -> torch.Tensor:
    return torch.stack([preprocess(img, size) for _, img in images])
