"""`tokenize-dataset` against the engine alone at saturation, on the same images, model and target:

    python loadtest/bulk_vs_engine.py runs/folders/bulk --repeats 3 [--model M] [--max-l1 0.07] [--json OUT]
        [--device cuda --dtype bfloat16]

Per round, interleaved: (1) the engine alone: every image of the folder decoded and preprocessed
beforehand (not timed), all queued at once on a fresh in-process `Engine` (continuous batching, the
service's settings) — what `alit-serve bench` measures as saturation throughput, for this one
target; (2) `tokenize-dataset` on the folder (reading, decoding, preprocessing, the engine, Parquet
writing; timed from the engine being ready, as its own img/s is). Reports each round, the medians and
their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.bulk import tokenize_dataset  # noqa: E402
from service.engine import Engine, Target  # noqa: E402
from service.imaging import ImageError, ImageLimits, decode_side, load_for_model  # noqa: E402
from service.model.registry import resolve  # noqa: E402
from service.settings import Settings, engine_settings  # noqa: E402


def engine_alone(loaded, pixels, target: Target, settings: Settings, device: str) -> float:
    eng = Engine(loaded, engine_settings(settings, device)).start()

    async def go():
        return await asyncio.gather(*(eng.tokenize(p, target) for p in pixels))

    try:
        t = time.perf_counter()
        asyncio.run(go())
        return len(pixels) / (time.perf_counter() - t)
    finally:
        eng.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder")
    p.add_argument("--model", default=None)
    p.add_argument("--max-l1", type=float, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu", help="as ALIT_DEVICES: cpu, cuda, cuda:0,cuda:1, ...")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--json")
    a = p.parse_args(argv)
    settings = Settings(max_queue=100_000, dtype=a.dtype)
    spec = a.model or settings.model
    loaded = resolve(spec)
    limits = loaded.limits
    target = Target(max_l1=a.max_l1 if a.max_l1 is not None else settings.default_max_l1)
    image_limits = ImageLimits(max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels)
    pixels = []
    for path in sorted(q for q in Path(a.folder).rglob("*") if q.is_file()):
        try:
            pixels.append(load_for_model(path.read_bytes(), limits.img_size, image_limits, limits.resample,
                                         decode_side(limits.img_size, settings.decode_scale)))
        except ImageError:
            pass
    rounds = []
    for rep in range(a.repeats):
        alone = engine_alone(loaded, pixels, target, settings, a.device)
        out = Path(tempfile.mkdtemp(prefix="bulk-bench-"))
        try:
            s = tokenize_dataset(a.folder, out, model=spec, max_l1=target.max_l1, devices=a.device, quiet=True,
                                 settings=settings)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        rounds.append({"engine_alone": alone, "tokenize_dataset": s.images_per_s,
                       "images": s.counts["this_run"], "ok": s.counts["ok"]})
        print(f"round {rep + 1}: engine alone {alone:.2f} img/s ({len(pixels)} images), tokenize-dataset "
              f"{s.images_per_s:.2f} img/s ({s.counts['this_run']} files, {s.counts['ok']} ok): "
              f"{s.images_per_s / alone:.2f}x", flush=True)
    med = {k: statistics.median(r[k] for r in rounds) for k in ("engine_alone", "tokenize_dataset")}
    med["ratio"] = med["tokenize_dataset"] / med["engine_alone"]
    print(f"median: engine alone {med['engine_alone']:.2f} img/s, tokenize-dataset {med['tokenize_dataset']:.2f} img/s "
          f"= {med['ratio']:.2f}x")
    if a.json:
        Path(a.json).write_text(json.dumps({"folder": a.folder, "model": spec, "device": a.device, "dtype": a.dtype,
                                            "target": target.to_dict(),
                                            "rounds": rounds, "median": med}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
