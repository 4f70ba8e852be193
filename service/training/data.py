"""Training and evaluation images: only pictures that arrive with installed packages, no downloads.

Training pool: random crops (random scale, position, flips, grey-image tints) of the sample images
bundled with scikit-image and scikit-learn, plus a few synthetic flat and gradient images, resized
to the model size with PIL bicubic. Everything is drawn from one seeded numpy generator, so a seed
gives the same pool on every machine.

With a corpus directory (`service/training/corpus.py`, built from Debian packages' photographs and
textures), its images are added to those sources; without one the pool is unchanged.

Held-out evaluation: the 7 photos of `tests/fixtures/alit-reference/images/` (never trained on),
preprocessed by the service's own `service.imaging` (shorter side to the model size, bicubic,
centre crop, [0, 1]), and deterministic crops of them chosen to span flat regions to dense texture (PNG size).
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..imaging import fit_to_model

ROOT = Path(__file__).resolve().parents[2]
HELDOUT_DIR = ROOT / "tests" / "fixtures" / "alit-reference" / "images"

# (package, file, licence) of every training source. Licences as documented by the packages.
SOURCES: list[tuple[str, str, str]] = [
    ("skimage", "astronaut.png", "public domain (NASA)"),
    ("skimage", "chelsea.png", "CC0 (Stefan van der Walt)"),
    ("skimage", "coffee.png", "CC0 (Rachel Michetti)"),
    ("skimage", "hubble_deep_field.jpg", "public domain (NASA/ESA)"),
    ("skimage", "ihc.png", "public domain (Wikimedia)"),
    ("skimage", "motorcycle_left.png", "Middlebury stereo dataset, free for research use"),
    ("skimage", "motorcycle_right.png", "Middlebury stereo dataset, free for research use"),
    ("skimage", "retina.jpg", "CC BY 4.0 (Wikimedia, Hÿkon Trivedi)"),
    ("skimage", "rocket.jpg", "public domain (SpaceX / Wikimedia)"),
    ("skimage", "color.png", "CC0 (scikit-image)"),
    ("skimage", "coins.png", "public domain (Walters Art Museum)"),
    ("skimage", "camera.png", "CC0 (scikit-image)"),
    ("skimage", "brick.png", "CC0 (scikit-image)"),
    ("skimage", "grass.png", "CC0 (scikit-image)"),
    ("skimage", "gravel.png", "CC0 (scikit-image)"),
    ("skimage", "moon.png", "public domain (NASA)"),
    ("skimage", "page.png", "CC0 (scikit-image)"),
    ("skimage", "text.png", "CC0 (scikit-image)"),
    ("skimage", "cell.png", "CC0 (scikit-image)"),
    ("skimage", "clock_motion.png", "CC0 (scikit-image)"),
    ("skimage", "horse.png", "public domain (openclipart)"),
    ("skimage", "logo.png", "CC0 (scikit-image logo)"),
    ("skimage", "phantom.png", "public domain (Shepp-Logan phantom)"),
    ("skimage", "chessboard_RGB.png", "CC0 (scikit-image)"),
    ("sklearn", "china.jpg", "CC BY 2.0 (Flickr, via scikit-learn)"),
    ("sklearn", "flower.jpg", "CC BY 2.0 (Flickr, via scikit-learn)"),
]


def source_path(package: str, name: str) -> Path:
    if package == "skimage":
        import skimage.data

        return Path(skimage.data.__file__).parent / name
    if package == "sklearn":
        import sklearn.datasets

        return Path(sklearn.datasets.__file__).parent / "images" / name
    raise ValueError(package)


SAMPLES = "samples"  # a corpus directory's copy of the sample images (`bundle_samples`)


def sample_file(package: str, name: str, corpus: str | Path | None = None) -> Path:
    """Where a sample image is read from: the installed package, or, where that package lacks it (a
    machine with another scikit-image, such as a GPU image), the copy in `corpus/samples/`."""
    try:
        path = source_path(package, name)
    except ImportError:
        path = Path("/nonexistent") / name
    if not path.is_file() and corpus is not None and (Path(corpus) / SAMPLES / name).is_file():
        return Path(corpus) / SAMPLES / name
    return path


def bundle_samples(corpus: str | Path) -> int:
    """Copy the sample images of `SOURCES` into `corpus/samples/` (what is there and equal is kept), so
    a corpus carried to another machine trains on the same sources; returns the number written."""
    dest = Path(corpus) / SAMPLES
    dest.mkdir(parents=True, exist_ok=True)
    written = 0
    for pkg, name, _ in SOURCES:
        data = source_path(pkg, name).read_bytes()
        target = dest / name
        if not target.is_file() or target.read_bytes() != data:
            tmp = target.with_name(target.name + ".tmp")
            tmp.write_bytes(data)
            tmp.replace(target)
            written += 1
    return written


def _decode(im: Image.Image) -> tuple[np.ndarray, bool]:
    grey = im.mode in ("L", "LA", "I", "I;16", "1")
    if im.mode in ("RGBA", "LA"):
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im.convert("RGBA"))
    return np.asarray(im.convert("RGB")), grey


def load_sources(corpus: str | Path | None = None) -> list[tuple[str, np.ndarray, bool]]:
    """(name, HxWx3 uint8, was_grey) for every training source: the sample images of `SOURCES`, then,
    with `corpus` (a directory built by `service.training.corpus`), every image its corpus.json
    lists, in that order, as `corpus:<package>/<file>`. A listed file that is missing or changed
    (sha256) is an error: rebuild the corpus. A sample image the installed package lacks is read
    from the corpus's copy (`bundle_samples`)."""
    out = []
    for pkg, name, _ in SOURCES:
        arr, grey = _decode(Image.open(sample_file(pkg, name, corpus)))
        out.append((name, arr, grey))
    if corpus is not None:
        from .corpus import load_manifest

        for f in load_manifest(corpus)["files"]:
            path = Path(corpus) / f["file"]
            data = path.read_bytes() if path.is_file() else b""
            if hashlib.sha256(data).hexdigest() != f["sha256"]:
                raise FileNotFoundError(f"{path} is missing or changed since corpus.json was written: rebuild "
                                        f"with `python -m service.training corpus --out {corpus}`")
            arr, grey = _decode(Image.open(io.BytesIO(data)))
            out.append((f"corpus:{f['file'].removeprefix('images/')}", arr, grey))
    return out


def _resize(arr: np.ndarray, size: int) -> np.ndarray:
    """A square crop to size x size (bicubic): the service's preprocessing of a square image."""
    return preprocess(Image.fromarray(arr), size)


def make_pool(n: int, size: int, seed: int, synthetic: float = 0.04, corpus: Path | None = None) -> np.ndarray:
    """n training crops (n, size, size, 3) uint8, deterministic for a seed (and corpus). Without a
    corpus the pool is the shipped model's, bit for bit; with one, its images are extra sources
    drawn like the others (probability proportional to sqrt(area))."""
    rng = np.random.default_rng(seed)
    sources = load_sources(corpus)
    areas = np.array([a.shape[0] * a.shape[1] for _, a, _ in sources], dtype=np.float64)
    weights = np.sqrt(areas)
    weights /= weights.sum()
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        u = rng.random()
        if u < synthetic / 2:  # flat colour
            out[i] = rng.integers(0, 256, size=3, dtype=np.uint8)
            continue
        if u < synthetic:  # linear gradient between two colours
            c0, c1 = rng.random(3), rng.random(3)
            ang = rng.random() * 2 * np.pi
            yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
            t = np.clip(0.5 + (np.cos(ang) * (xx - 0.5) + np.sin(ang) * (yy - 0.5)), 0, 1)[..., None]
            out[i] = np.round(255 * ((1 - t) * c0 + t * c1)).astype(np.uint8)
            continue
        k = rng.choice(len(sources), p=weights)
        _, arr, grey = sources[k]
        h, w = arr.shape[:2]
        smax = min(h, w)
        smin = min(smax, max(size // 2, 24))
        s = int(round(np.exp(rng.uniform(np.log(smin), np.log(smax)))))
        y, x = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
        crop: np.ndarray = _resize(np.ascontiguousarray(arr[y : y + s, x : x + s]), size).astype(np.float32)
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        if grey and rng.random() < 0.7:  # tint grey sources so they are not all neutral
            tint = rng.uniform(0.6, 1.0, size=3)
            crop = crop * tint + rng.uniform(0, 40, size=3) * (1 - crop / 255.0)
        elif rng.random() < 0.3:  # mild colour jitter
            crop = crop * rng.uniform(0.8, 1.15, size=3)
        out[i] = np.clip(np.round(crop), 0, 255).astype(np.uint8)
    return out


def _pool_chunk(job: tuple[int, int, int, str | None]) -> np.ndarray:
    n, size, seed, corpus = job
    return make_pool(n, size, seed, corpus=None if corpus is None else Path(corpus))


def make_pool_parallel(n: int, size: int, seed: int, corpus: Path | None, workers: int) -> np.ndarray:
    """`make_pool` in `workers` processes, chunk i with seed `seed * 1000 + i`: deterministic for a
    seed and a worker count, but not the one-process pool."""
    sizes = [n // workers + (i < n % workers) for i in range(workers)]
    jobs = [(k, size, seed * 1000 + i, None if corpus is None else str(corpus)) for i, k in enumerate(sizes)]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        return np.concatenate(pool.map(_pool_chunk, jobs))


def pool_cached(path: Path, n: int, size: int, seed: int, corpus: Path | None = None, workers: int = 1) -> np.ndarray:
    """make_pool's result cached at `path` (.npy), made by `workers` processes when more than one
    (`make_pool_parallel`). The file is reused whenever its shape matches: the caller names it after
    everything else that makes the pool (seed, corpus, workers)."""
    path = Path(path)
    if path.is_file():
        arr = np.load(path)
        if arr.shape == (n, size, size, 3):
            return arr
    arr = (make_pool(n, size, seed, corpus=corpus) if workers <= 1
           else make_pool_parallel(n, size, seed, corpus, workers))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, arr)
    tmp.replace(path)
    return arr


def to_tensor(batch: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float().div_(255.0)


# ----- evaluation images ----------------------------------------------------------------------


def preprocess(im: Image.Image, size: int) -> np.ndarray:
    """The service's preprocessing (`service.imaging.fit_to_model`) as HxWx3 uint8."""
    return np.asarray(fit_to_model(im, size))


def image_files(folder: str | Path) -> list[Path]:
    exts = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in exts)


def load_folder(folder: str | Path, size: int) -> tuple[list[str], np.ndarray]:
    files = image_files(folder)
    if not files:
        raise FileNotFoundError(f"no images under {folder}")
    names = [str(p.relative_to(folder)) for p in files]
    return names, np.stack([preprocess(Image.open(p), size) for p in files])


def png_size(arr: np.ndarray) -> int:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=False)
    return len(buf.getbuffer())


@dataclass
class Crops:
    names: list[str]
    images: np.ndarray  # (N, size, size, 3) uint8
    png_bytes: np.ndarray  # (N,)


def heldout_crops(size: int, n: int = 48, folder: str | Path = HELDOUT_DIR) -> Crops:
    """Deterministic crops of the held-out photos spanning flat to textured content.

    Candidates: for every photo, square crops of side = shorter side x {1, 1/2, 1/4, 1/8} on a
    3x3 grid of positions, resized to `size`. Sorted by PNG size, `n` are taken at evenly spaced
    ranks, so the set spans the whole complexity range."""
    cands: list[tuple[int, str, np.ndarray]] = []
    for p in image_files(folder):
        arr = np.asarray(Image.open(p).convert("RGB"))
        h, w = arr.shape[:2]
        short = min(h, w)
        for frac in (1, 2, 4, 8):
            s = short // frac
            if s < 16:
                continue
            for fy in (0.0, 0.5, 1.0):
                for fx in (0.0, 0.5, 1.0):
                    y, x = int(fy * (h - s)), int(fx * (w - s))
                    crop = _resize(np.ascontiguousarray(arr[y : y + s, x : x + s]), size)
                    name = f"{p.stem}@{frac}:{fy:.1f},{fx:.1f}"
                    cands.append((png_size(crop), name, crop))
    cands.sort(key=lambda c: (c[0], c[1]))
    idx = np.unique(np.round(np.linspace(0, len(cands) - 1, n)).astype(int))
    sel = [cands[i] for i in idx]
    return Crops([c[1] for c in sel], np.stack([c[2] for c in sel]), np.array([c[0] for c in sel]))


def flat_and_noise(size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A flat single-colour image and a uniform-noise image (HxWx3 uint8)."""
    flat = np.empty((size, size, 3), dtype=np.uint8)
    flat[:] = np.array([90, 140, 200], dtype=np.uint8)
    noise = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    return flat, noise
