"""What reduced decoding (JPEG DCT scaling / box reduce, `ALIT_DECODE_SCALE`) does to the model input
and to the tokens, against decoding every pixel: the figures behind the default (docs/intake.md).

Photos: the 7 held-out photos of tests/fixtures/alit-reference/images at their own size (256 px PNGs,
640x480-class JPEGs), and each of them resized to 4000x3000 (12 MP; JPEG quality 90, or PNG),
which is what callers send. (Upscaled, so finer detail than the originals have is missing: the
12 MP figures show the decode path at photo sizes, the native ones the effect on real detail.)
For each decode scale: the model input's difference from the full decode (8-bit levels), and with
the served model, the tokens of all 8 iterations (position-wise agreement) and the number of
tokens the default target (max_l1 0.07) returns.

    python loadtest/intake_quality.py --json docs/intake_quality.json
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.settings import Settings  # noqa: E402
from service.engine import Engine, EngineSettings, Target  # noqa: E402
from service.imaging import decode_image, preprocess  # noqa: E402
from service.model.registry import resolve  # noqa: E402

PHOTOS = sorted((ROOT / "tests" / "fixtures" / "alit-reference" / "images").rglob("*.*"))
SCALES = (8.0, 4.0, 2.0, 1.0)


def variants() -> list[tuple[str, bytes]]:
    out = []
    for p in PHOTOS:
        data = p.read_bytes()
        out.append((f"{p.parent.name}/{p.name}", data))
        img = Image.open(io.BytesIO(data)).convert("RGB")
        w, h = img.size
        big = img.resize((4000, 3000) if w >= h else (3000, 4000), Image.LANCZOS)
        buf = io.BytesIO()
        fmt = "PNG" if p.suffix == ".png" else "JPEG"
        big.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {"compress_level": 1}))
        out.append((f"{p.parent.name}/{p.stem}@12MP.{fmt.lower()}", buf.getvalue()))
    return out


async def tokens(engine: Engine, img) -> tuple[list[np.ndarray], int]:
    full = await engine.tokenize(img, Target(tokens=engine.limits.max_tokens), trajectory=True)
    default = await engine.tokenize(img, Target(max_l1=0.07))
    return [r.token_ids for r in full.trajectory], default.num_tokens


async def measure(model: str) -> dict:
    loaded = resolve(model)
    size = loaded.config.img_size
    engine = Engine(loaded, EngineSettings(devices="cpu", warmup=False)).start()
    rows = []
    try:
        for name, data in variants():
            t = time.perf_counter()
            ref_img = preprocess(decode_image(data), size)
            full_ms = (time.perf_counter() - t) * 1e3
            ref_traj, ref_n = await tokens(engine, ref_img)
            ref8 = (ref_img * 255).round()
            # control: the full decode with 10 % of its values moved by one 8-bit level at random: how much
            # the tokens move for a change of the size reduced decoding makes
            gen = torch.Generator().manual_seed(0)
            step = (torch.rand(ref8.shape, generator=gen) < 0.1) * (torch.randint(0, 2, ref8.shape, generator=gen) * 2 - 1)
            noisy = (ref8 + step).clamp(0, 255) / 255
            traj, n = await tokens(engine, noisy)
            agree = [float((a == b).mean()) for a, b in zip(traj, ref_traj)]
            rows.append({"image": name, "scale": "control", "input_mean_abs_diff": round(float(((noisy * 255).round() - ref8).abs().mean()), 3),
                         "token_agreement_per_iteration": [round(a, 3) for a in agree],
                         "tokens_identical_all_iterations": all(a == 1.0 for a in agree),
                         "default_target_tokens": n, "default_target_tokens_full_decode": ref_n})
            print(f"{name:45s} control (10% of values +-1 level): agree@256 {agree[-1]:.3f} default {n} vs {ref_n}", flush=True)
            for scale in SCALES:
                t = time.perf_counter()
                decoded = decode_image(data, min_side=max(size, round(scale * size)))
                img = preprocess(decoded, size)
                ms = (time.perf_counter() - t) * 1e3
                diff = ((img * 255).round() - ref8).abs()
                traj, n = await tokens(engine, img)
                agree = [float((a == b).mean()) for a, b in zip(traj, ref_traj)]
                rows.append({"image": name, "bytes": len(data), "scale": scale, "decoded": list(decoded.size),
                             "decode_ms": round(ms, 1), "full_decode_ms": round(full_ms, 1),
                             "input_mean_abs_diff": round(float(diff.mean()), 3), "input_max_abs_diff": int(diff.max()),
                             "token_agreement_per_iteration": [round(a, 3) for a in agree],
                             "tokens_identical_all_iterations": all(a == 1.0 for a in agree),
                             "default_target_tokens": n, "default_target_tokens_full_decode": ref_n})
                print(f"{name:45s} x{scale:<3g} {decoded.size[0]:5d}x{decoded.size[1]:<5d} {ms:7.1f} ms "
                      f"(full {full_ms:6.1f}) mean|d| {diff.mean():6.3f} max|d| {int(diff.max()):3d} "
                      f"agree@256 {agree[-1]:.3f} default {n} vs {ref_n}", flush=True)
    finally:
        engine.shutdown()
    summary = {}
    ctrl = [r for r in rows if r["scale"] == "control"]
    for group, sel in (("control_12mp", [r for r in ctrl if "12MP" in r["image"]]),
                       ("control_native", [r for r in ctrl if "12MP" not in r["image"]])):
        summary[group] = {
            "images": len(sel), "mean_input_abs_diff": round(float(np.mean([r["input_mean_abs_diff"] for r in sel])), 3),
            "images_with_identical_tokens": sum(r["tokens_identical_all_iterations"] for r in sel),
            "mean_token_agreement_at_32": round(float(np.mean([r["token_agreement_per_iteration"][0] for r in sel])), 3),
            "mean_token_agreement_at_256": round(float(np.mean([r["token_agreement_per_iteration"][-1] for r in sel])), 3),
            "images_with_same_default_length": sum(r["default_target_tokens"] == r["default_target_tokens_full_decode"]
                                                   for r in sel)}
    for scale in SCALES:
        sel = [r for r in rows if r["scale"] == scale]
        big = [r for r in sel if "12MP" in r["image"]]
        summary[str(scale)] = {
            "images": len(sel),
            "mean_input_abs_diff": round(float(np.mean([r["input_mean_abs_diff"] for r in sel])), 3),
            "max_input_abs_diff": max(r["input_max_abs_diff"] for r in sel),
            "images_with_identical_tokens": sum(r["tokens_identical_all_iterations"] for r in sel),
            "mean_token_agreement_at_256": round(float(np.mean([r["token_agreement_per_iteration"][-1] for r in sel])), 3),
            "images_with_same_default_length": sum(r["default_target_tokens"] == r["default_target_tokens_full_decode"]
                                                   for r in sel),
            "12mp_images_with_identical_tokens": sum(r["tokens_identical_all_iterations"] for r in big),
            "12mp_mean_token_agreement_at_32": round(float(np.mean([r["token_agreement_per_iteration"][0] for r in big])), 3),
            "12mp_mean_token_agreement_at_256": round(float(np.mean([r["token_agreement_per_iteration"][-1] for r in big])), 3),
            "12mp_images_with_same_default_length": sum(r["default_target_tokens"] == r["default_target_tokens_full_decode"]
                                                        for r in big),
            "mean_decode_ms_12mp_jpeg": round(float(np.mean([r["decode_ms"] for r in big if r["image"].endswith("jpeg")])), 1),
            "mean_full_decode_ms_12mp_jpeg": round(float(np.mean([r["full_decode_ms"] for r in big if r["image"].endswith("jpeg")])), 1),
            "mean_decode_ms_12mp": round(float(np.mean([r["decode_ms"] for r in sel if "12MP" in r["image"]])), 1),
            "mean_full_decode_ms_12mp": round(float(np.mean([r["full_decode_ms"] for r in sel if "12MP" in r["image"]])), 1),
        }
    return {"model": model, "image_size": size, "rows": rows, "summary": summary}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=Settings().model)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    report = asyncio.run(measure(args.model))
    print(json.dumps(report["summary"], indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
