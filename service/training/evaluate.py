"""`alit-serve evaluate DIR`: per-iteration L1 / PSNR of a model on a folder of images, a picture
(one row per image: the original, then the reconstruction after each iteration, 32 ... 256 tokens),
and optionally the issue-9 checks: held-out crops, halting iteration vs PNG size (Spearman rho),
a flat image and a noise image.

Everything runs through the serving step API (`prepare` / `advance` / `decode_logits` /
`reconstruct`), so it measures exactly what the service would return.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..model.alit import ALIT, reference_stop_iteration
from ..model.measure import iterate_and_measure
from .data import flat_and_noise, heldout_crops, load_folder, png_size, to_tensor


def load_images(folder: str | Path, size: int) -> tuple[list[str], torch.Tensor]:
    """Every image under `folder`, preprocessed as the service does: (names, (N, 3, size, size))."""
    names, arr = load_folder(folder, size)
    return names, to_tensor(arr)


@torch.no_grad()
def per_iteration(model: ALIT, images: torch.Tensor, halting: bool = True, batch: int = 16,
                  keep_recons: bool = False):
    """-> (l1 (N, iters), psnr (N, iters), recons (N, iters, 3, H, W) or None), on the CPU; the model
    runs on its own device."""
    device = model.vqgan.codebook.device
    l1s, psnrs, recs = [], [], []
    for i in range(0, len(images), batch):
        rows = list(iterate_and_measure(model, images[i : i + batch].to(device), halting=halting))
        l1s.append(torch.stack([r.l1 for r in rows], 1).cpu())
        psnrs.append(torch.stack([r.psnr for r in rows], 1).cpu())
        if keep_recons:
            recs.append(torch.stack([r.recon.clamp(0, 1) for r in rows], 1).cpu())
    return torch.cat(l1s), torch.cat(psnrs), (torch.cat(recs) if keep_recons else None)


@torch.no_grad()
def vqgan_l1(model: ALIT, images: torch.Tensor) -> torch.Tensor:
    """The base VQGAN's own per-image L1 (nearest codes -> decoder): the quality ceiling."""
    vq = model.vqgan
    images = images.to(vq.codebook.device)
    z, idx = vq.encode(images)
    q = vq.codebook[idx].view(z.shape[0], z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2)
    return (vq.decode(q) - images).abs().flatten(1).mean(1).cpu()


def spearman(a, b) -> float:
    """Spearman rank correlation with average ranks for ties."""

    def ranks(v):
        v = np.asarray(v, dtype=np.float64)
        order = np.argsort(v, kind="mergesort")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=np.float64)
        for val in np.unique(v):  # average ties
            m = v == val
            r[m] = r[m].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = np.sqrt((ra**2).sum() * (rb**2).sum())
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def halting_iterations(l1: np.ndarray, threshold: float) -> np.ndarray:
    """1-based halting iteration of every row under the reference stop rule."""
    return np.array([reference_stop_iteration(list(row), threshold) + 1 for row in l1])


def choose_threshold(l1: np.ndarray, min_distinct: int = 4) -> float:
    """A fixed L1 threshold for the halting-vs-content check, chosen without looking at PNG sizes:
    the median over images of the L1 at the last iteration (so about half of the images can meet
    it). If that spreads halting iterations over fewer than `min_distinct` values, the candidate
    quantile of all L1 values with the most distinct halting iterations (most even spread) is used.
    Where no iteration meets the threshold the reference rule returns the lowest-L1 iteration."""
    t = float(np.median(l1[:, -1]))
    if len(np.unique(halting_iterations(l1, t))) >= min_distinct:
        return t
    cands = np.unique(np.quantile(l1, np.linspace(0.02, 0.98, 97)))
    best, best_key = t, (-1, -1.0)
    for c in cands:
        h = halting_iterations(l1, float(c))
        _, counts = np.unique(h, return_counts=True)
        p = counts / counts.sum()
        key = (len(counts), float(-(p * np.log(p)).sum()))
        if key > best_key:
            best, best_key = float(c), key
    return best


def grid_picture(originals: torch.Tensor, recons: torch.Tensor, path: Path, scale: int = 2, pad: int = 2) -> None:
    """One row per image: original, then one column per iteration."""
    n, iters = recons.shape[:2]
    h, w = originals.shape[-2:]
    cols = iters + 1
    canvas = np.full((n * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        tiles = [originals[i]] + [recons[i, k] for k in range(iters)]
        for j, t in enumerate(tiles):
            arr = (t.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            canvas[y : y + h, x : x + w] = arr
    im = Image.fromarray(canvas)
    if scale != 1:
        im = im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def complexity_checks(model: ALIT, halting: bool = True, n_crops: int = 48) -> dict:
    """Issue-9 checks on held-out crops: per-iteration mean L1, rho(halting iteration, PNG size),
    the VQGAN ceiling rho, a flat image and a noise image."""
    size = model.cfg.img_size
    crops = heldout_crops(size, n_crops)
    x = to_tensor(crops.images)
    l1, psnr, _ = per_iteration(model, x, halting=halting)
    l1 = l1.numpy()
    thr = choose_threshold(l1)
    stops = halting_iterations(l1, thr)
    flat, noise = flat_and_noise(size)
    fn = to_tensor(np.stack([flat, noise]))
    fn_l1, _, _ = per_iteration(model, fn, halting=halting)
    fn_stop = halting_iterations(fn_l1.numpy(), thr)
    vq = vqgan_l1(model, x).numpy()
    sweep = {}
    for q in (0.2, 0.35, 0.5, 0.65, 0.8):
        t = float(np.quantile(l1, q))
        h = halting_iterations(l1, t)
        sweep[f"{t:.4f}"] = {"distinct": int(len(np.unique(h))), "rho": spearman(h, crops.png_bytes)}
    mean = l1.mean(0)
    return {
        "crops": len(crops.names),
        "png_bytes_min": int(crops.png_bytes.min()),
        "png_bytes_max": int(crops.png_bytes.max()),
        "crop_mean_l1": [float(v) for v in mean],
        "crop_mean_psnr": [float(v) for v in psnr.numpy().mean(0)],
        "crop_l1_falls_every_iteration": bool(np.all(np.diff(mean) < 0)),
        "crop_ratio_256_32": float(mean[-1] / mean[0]),
        "threshold": thr,
        "halting_iterations": stops.tolist(),
        "distinct_halting_iterations": int(len(np.unique(stops))),
        "rho_halting_vs_png": spearman(stops, crops.png_bytes),
        "rho_final_l1_vs_png": spearman(l1[:, -1], crops.png_bytes),
        "rho_vqgan_l1_vs_png": spearman(vq, crops.png_bytes),
        "threshold_sweep": sweep,
        "flat_l1": [float(v) for v in fn_l1[0]],
        "noise_l1": [float(v) for v in fn_l1[1]],
        "flat_halts_at": int(fn_stop[0]),
        "noise_halts_at": int(fn_stop[1]),
        "flat_meets_threshold_at_1": bool(fn_l1[0, 0] < thr),
        "noise_ever_meets_threshold": bool((fn_l1[1] < thr).any()),
        "flat_png_bytes": png_size(flat),
        "noise_png_bytes": png_size(noise),
    }


def load_any(path: str) -> ALIT:
    from ..model.registry import resolve

    return resolve(path).model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="alit-serve evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("dir", help="folder of images (searched recursively)")
    p.add_argument("--model", default="service/weights",
                   help="weights directory / file / preset:NAME (default: service/weights)")
    p.add_argument("--out", default=None,
                   help="folder for metrics.json and grid.png (default: print only + ./evaluate-out)")
    p.add_argument("--picture", default=None, help="path of the PNG grid (default: OUT/grid.png)")
    p.add_argument("--no-halting", action="store_true", help="run without 2D-token halting")
    p.add_argument("--checks", action="store_true", help="also run the issue-9 checks on held-out crops of DIR")
    p.add_argument("--crops", type=int, default=48, help="number of crops for --checks")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    try:
        model = load_any(args.model)
    except Exception as e:  # a clear message rather than a traceback
        print(f"error: cannot load model {args.model!r}: {e}", file=sys.stderr)
        return 2
    model.eval()
    try:
        names, x = load_images(args.dir, model.cfg.img_size)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    halting = not args.no_halting
    l1, psnr, recs = per_iteration(model, x, halting=halting, keep_recons=True)
    out = Path(args.out) if args.out else Path("evaluate-out")
    picture = Path(args.picture) if args.picture else out / "grid.png"
    grid_picture(x, recs, picture)
    tpi = model.cfg.tokens_per_iter
    print(f"{len(names)} images, halting {'on' if halting else 'off'}; columns: tokens")
    header = "image".ljust(34) + "".join(f"{tpi * (k + 1):>8d}" for k in range(model.cfg.max_iters))
    print(header)
    for name, row in zip(names, l1.numpy()):
        print(name[:33].ljust(34) + "".join(f"{v:8.4f}" for v in row))
    print("mean L1".ljust(34) + "".join(f"{v:8.4f}" for v in l1.mean(0).numpy()))
    print("mean PSNR dB".ljust(34) + "".join(f"{v:8.2f}" for v in psnr.mean(0).numpy()))
    mean = l1.mean(0).numpy()
    metrics = {
        "model": args.model,
        "images": names,
        "halting": halting,
        "tokens": [tpi * (k + 1) for k in range(model.cfg.max_iters)],
        "l1": l1.numpy().tolist(),
        "psnr": psnr.numpy().tolist(),
        "mean_l1": mean.tolist(),
        "mean_psnr": psnr.mean(0).numpy().tolist(),
        "vqgan_l1": float(vqgan_l1(model, x).mean()),
        "l1_falls_every_iteration": bool(np.all(np.diff(mean) < 0)),
        "ratio_256_32": float(mean[-1] / mean[0]),
    }
    print(f"VQGAN (ceiling) L1 {metrics['vqgan_l1']:.4f}; L1 last/first {metrics['ratio_256_32']:.3f}; "
          f"falls at every iteration: {metrics['l1_falls_every_iteration']}")
    if args.checks:
        c = complexity_checks(model, halting=halting, n_crops=args.crops)
        metrics["checks"] = c
        print(f"crops: {c['crops']} (PNG {c['png_bytes_min']}..{c['png_bytes_max']} bytes); mean L1 per iteration "
              + " ".join(f"{v:.4f}" for v in c["crop_mean_l1"]))
        print(f"crops L1 last/first {c['crop_ratio_256_32']:.3f}, "
              f"falls every iteration: {c['crop_l1_falls_every_iteration']}")
        print(f"threshold {c['threshold']:.4f}: {c['distinct_halting_iterations']} distinct halting iterations, "
              f"rho(halting, PNG) = {c['rho_halting_vs_png']:.3f}; "
              f"VQGAN ceiling rho(L1, PNG) = {c['rho_vqgan_l1_vs_png']:.3f}")
        print(f"flat image halts at iteration {c['flat_halts_at']}, noise at {c['noise_halts_at']} "
              f"(noise ever meets the threshold: {c['noise_ever_meets_threshold']})")
    metrics["seconds"] = time.time() - t0
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(f"wrote {picture} and {out / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
