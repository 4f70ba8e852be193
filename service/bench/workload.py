"""The benchmark's workload, built from a folder of images: the images, crops of them at several
scales, flat colours and noise; quality targets calibrated on the model being measured, so halting
spreads whatever the model; and, per request, the probes the model walks before it answers.

Everything model-specific goes through the family interface (model/family.py): a target's probes are
`Target.ladder(limits)` (ALIT: iterations 1, 2, ...; KARL: one pass at a budget and quality bin, and
stricter bins after it with `retry_stricter`), and each probe's quality is measured by walking those
ladders as the engine does: `prepare`, then `advance` probe after probe, `decode_logits` where the
probe did not decode already, `reconstruct`, L1 / PSNR against the input."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch
from PIL import Image

from ..engine import Target, TargetError
from ..engine.records import IterationRecord
from ..imaging import preprocess
from ..model.family import Limits, StepOutput, Tokenizer, quality

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


def default_walk(limits: Limits) -> list[int]:
    """The probes a target naming no field walks: the longest walk of an iterative family (ALIT:
    every iteration), one pass at the default budget and strictest conditioning for KARL."""
    return limits.ladder(None, None, None, None)


def walks_of(targets: list[Target], limits: Limits) -> list[list[int]]:
    """The distinct ladders of `targets`, less those that begin another one (walking the longer one
    runs them too), in first-seen order."""
    ladders: list[list[int]] = []
    for t in targets:
        lad = t.ladder(limits)
        if lad not in ladders:
            ladders.append(lad)
    return [a for a in ladders if not any(b != a and b[:len(a)] == a for b in ladders)]


def model_device(model: Tokenizer) -> torch.device:
    return next(cast(torch.nn.Module, model).parameters()).device


def probe_logits(model: Tokenizer, outs: Sequence[StepOutput]) -> torch.Tensor:
    """(B, G, V) logits of one `advance()` result: decoded there already when the probe decodes
    (ALIT with 2D-token halting), decoded here otherwise (with the ids' positions, where they have them)."""
    decoded = [o.logits for o in outs if o.logits is not None]
    if len(decoded) == len(outs):
        return torch.stack(decoded)
    positions = [o.positions for o in outs]
    return model.decode_logits([o.token_ids for o in outs],
                               positions if any(p is not None for p in positions) else None)


@dataclass
class Measured:
    """Every image's quality at every measured probe: row r of `l1` / `psnr` is probe `keys[r]`,
    one column per image. A probe key names the same computation whatever the ladder that ran it
    (family.py), so one row answers every target whose ladder holds that key."""

    keys: list[int]
    l1: np.ndarray  # (len(keys), n)
    psnr: np.ndarray  # (len(keys), n)

    def row(self, key: int) -> int:
        return self.keys.index(key)

    def records(self, image: int) -> dict[int, IterationRecord]:
        """Image `image`'s probes as the engine records them (quality only: no tokens kept)."""
        return {k: IterationRecord(k, np.zeros(0, np.int32), float(self.l1[r, image]), float(self.psnr[r, image]))
                for r, k in enumerate(self.keys)}

    def missing(self, walks: list[list[int]]) -> list[list[int]]:
        """The walks holding a probe not measured yet."""
        return [w for w in walks if any(k not in self.keys for k in w)]

    def merged(self, other: Measured) -> Measured:
        new = [r for r, k in enumerate(other.keys) if k not in self.keys]
        return Measured(self.keys + [other.keys[r] for r in new], np.concatenate([self.l1, other.l1[new]]),
                        np.concatenate([self.psnr, other.psnr[new]]))


def measure(model: Tokenizer, images: torch.Tensor, walks: list[list[int]], halting: bool, batch: int = 32,
            skip: Sequence[int] = ()) -> Measured:
    """Every image along every walk, in batches of `batch`: each walk's probes run in order from
    freshly prepared states (as the engine runs a ladder; ALIT's probes need the ones before them),
    and each probe's reconstruction is measured once (not those in `skip`, nor one an earlier walk
    measured). A walk stops at its last probe still to measure."""
    n = images.shape[0]
    rows: dict[int, tuple[list[np.ndarray], list[np.ndarray]]] = {}
    dev = model_device(model)
    with torch.inference_mode():
        for walk in walks:
            todo = [k for k in walk if k not in skip and k not in rows]
            if not todo:
                continue
            steps = walk[: walk.index(todo[-1]) + 1]
            for key in todo:
                rows[key] = ([], [])
            for i in range(0, n, batch):
                chunk = images[i : i + batch].to(dev)
                states = model.prepare(chunk)
                for key in steps:
                    outs = model.advance(states, probes=[key] * len(states), halting=halting)
                    if key in todo:
                        l1, psnr = quality(model.reconstruct(probe_logits(model, outs)), chunk)
                        rows[key][0].append(l1.cpu().numpy())
                        rows[key][1].append(psnr.cpu().numpy())
    keys = list(rows)
    if not keys:
        return Measured([], np.zeros((0, n), np.float32), np.zeros((0, n), np.float32))
    return Measured(keys, np.stack([np.concatenate(rows[k][0]) for k in keys]),
                    np.stack([np.concatenate(rows[k][1]) for k in keys]))


def _budgets(limits: Limits) -> list[int]:
    """Three token budgets the model takes: its 2nd, 4th and last histogram bucket (ALIT: 2, 4 and
    every iteration's tokens)."""
    buckets = limits.token_buckets()
    out: list[int] = []
    for b in (buckets[min(1, len(buckets) - 1)], buckets[min(3, len(buckets) - 1)], buckets[-1]):
        try:
            b = limits.check_budget("tokens", b)
        except TargetError:
            continue
        if b not in out:
            out.append(b)
    return out


def calibrate(measured: Measured, limits: Limits) -> list[Target]:
    """Targets spread over what the model does on these images, in the fields its family honours.

    Quality levels from the default walk (`default_walk`): when it has several probes, the median
    image's L1 after its 2nd, 4th and 6th probe (PSNR: after the 4th); when it has one, that probe's
    L1 at the 75th, 50th and 25th percentile of the images (PSNR: the median). Then three token budgets
    (`_budgets`): exact ones where the family takes `tokens`, else caps (`max_tokens`) on the middle L1
    level. ALIT: max_l1 after 2, 4, 6 iterations, min_psnr after 4, tokens 64, 128 and 256."""
    walk = default_walk(limits)
    k = len(walk)

    def level(arr: np.ndarray, depth: int, q: float) -> float:
        return float(np.quantile(arr[measured.row(walk[min(depth, k - 1)])], q))

    if k >= 2:
        levels = [level(measured.l1, d, 0.5) for d in (1, 3, 5)]
        psnr_level = level(measured.psnr, 3, 0.5)
    else:
        levels = [level(measured.l1, 0, q) for q in (0.75, 0.5, 0.25)]
        psnr_level = level(measured.psnr, 0, 0.5)
    accepts = limits.accepts
    targets = [Target(max_l1=v) for v in levels] if "max_l1" in accepts else []
    if "min_psnr" in accepts:
        targets.append(Target(min_psnr=psnr_level))
    if "tokens" in accepts:
        targets += [Target(tokens=b) for b in _budgets(limits)]
    elif "max_tokens" in accepts and "max_l1" in accepts:
        targets += [Target(max_l1=levels[1], max_tokens=b) for b in _budgets(limits)]
    if not targets:
        raise WorkloadError(f"the model takes none of the targets this benchmark calibrates (it accepts "
                            f"{', '.join(accepts)})")
    return targets


@dataclass(frozen=True)
class Request:
    image: int  # index into the corpus
    target: Target
    halts_at: int  # probes the engine runs for it (from the measured probes)
    target_met: bool


def plan(measured: Measured, image: int, target: Target, limits: Limits) -> tuple[int, bool]:
    """How many probes `target` walks on image `image`, and whether it is met, by the engine's own
    rule (`Target.select`)."""
    sel = target.select(measured.records(image), limits)
    if sel is None:
        raise WorkloadError(f"target {target.to_dict()} walks probes {target.ladder(limits)}, not all measured "
                            f"(measured: {measured.keys})")
    return sel.iterations, sel.target_met


def plan_requests(n: int, n_images: int, targets: list[Target], measured: Measured, limits: Limits,
                  seed: int) -> list[Request]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        i, t = rng.randrange(n_images), rng.choice(targets)
        out.append(Request(i, t, *plan(measured, i, t, limits)))
    return out


# ----- the same on arrays of the default walk's probes (one row per probe, as loadtest/ scripts use) -----


def measure_iterations(model: Tokenizer, images: torch.Tensor, halting: bool,
                       batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Every probe of the default walk for every image: (L1, PSNR), each (len(walk), n) (ALIT: every
    iteration)."""
    m = measure(model, images, [default_walk(model.limits)], halting, batch)
    return m.l1, m.psnr


def calibrate_targets(l1: np.ndarray, psnr: np.ndarray, limits: Limits) -> list[Target]:
    return calibrate(Measured(default_walk(limits), l1, psnr), limits)


def halting_plan(l1: np.ndarray, psnr: np.ndarray, image: int, target: Target, limits: Limits) -> tuple[int, bool]:
    return plan(Measured(default_walk(limits), l1, psnr), image, target, limits)


def requests(n: int, n_images: int, targets: list[Target], l1: np.ndarray, psnr: np.ndarray,
             limits: Limits, seed: int) -> list[Request]:
    """Requests whose targets walk only the default walk's probes (an iterative family's)."""
    return plan_requests(n, n_images, targets, Measured(default_walk(limits), l1, psnr), limits, seed)


def poisson(rate: float, n: int, seed: int) -> list[float]:
    """Arrival times (s) of n requests at `rate` per second, Poisson."""
    rng = np.random.default_rng(seed)
    return list(np.cumsum(rng.exponential(1.0 / rate, size=n)))


def tensors(images: list[tuple[str, Image.Image]], size: int, resample: str = "bicubic") -> torch.Tensor:
    return torch.stack([preprocess(img, size, resample) for _, img in images])
