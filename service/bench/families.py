"""`alit-serve bench --families NAME=SPEC,...`: model families at the same quality targets.

Every model gets the same images (the benchmark's corpus of `--images`, preprocessed at each model's
own size) and, for each `max_l1` target of `--targets`, every image goes through the real in-process
`Engine` at saturation: all queued at once, continuous batching, one engine per model (started and
warmed once). Per (model, target) it reports the cost per image (wall seconds / images, and the
engine's `compute_s` per image, from admission to answer, averaged), the probes and pixel decodes per
image, the tokens chosen (mean, median), the fraction of images whose target was met, and the mean L1.

What the figures mean: the cost columns are what the engine spends on this hardware for models of
these shapes, whatever their weights. Tokens, L1 and target-met depend on the weights: with random
weights (`preset:...`) they describe no tokenizer anyone would use, so read them as plumbing only.
The model is used through the family interface only (`Limits.ladder`, the engine): no family is named.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

DEFAULT_TARGETS = (0.05, 0.1, 0.2)
RANDOM_WEIGHTS_NOTE = ("random-weight presets (preset:...) give meaningful COST (wall and compute time, probes and "
                       "decodes follow the models' shapes and the engine) but NOT meaningful tokens, L1 or "
                       "target-met: those need trained weights")
COLUMNS = (  # (key, header, format)
    ("model", "model", "{}"), ("family", "family", "{}"), ("img_size", "px", "{}"), ("max_l1", "max_l1", "{:g}"),
    ("images", "images", "{}"), ("wall_ms_per_image", "wall ms/img", "{:.2f}"),
    ("compute_ms_mean", "compute ms", "{:.1f}"), ("probes_per_image", "probes/img", "{:.2f}"),
    ("pixel_decodes_per_image", "decodes/img", "{:.2f}"), ("tokens_mean", "tokens mean", "{:.1f}"),
    ("tokens_median", "median", "{:g}"), ("target_met_fraction", "met", "{:.0%}"), ("l1_mean", "L1 mean", "{:.4f}"),
)


class FamiliesError(ValueError):
    """A --families or --targets value that cannot be used (the message says why)."""


def parse_families(text: str) -> list[tuple[str, str]]:
    """`alit=preset:alit_small,karl=preset:karl_small` -> [(name, spec), ...]; names unique."""
    out: list[tuple[str, str]] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, eq, spec = part.partition("=")
        if not eq or not name.strip() or not spec.strip():
            raise FamiliesError(f"--families: {part!r} is not NAME=SPEC (e.g. karl=preset:karl_small)")
        if name.strip() in dict(out):
            raise FamiliesError(f"--families: the name {name.strip()!r} is given twice")
        out.append((name.strip(), spec.strip()))
    if not out:
        raise FamiliesError("--families: no models given (NAME=SPEC,...)")
    return out


def parse_targets(text: str) -> list[float]:
    try:
        out = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise FamiliesError(f"--targets: {text!r} is not a comma-separated list of numbers") from None
    if not out or any(not 0 < x <= 1 for x in out):
        raise FamiliesError(f"--targets: max_l1 levels must lie in (0, 1], got {text!r}")
    return out


def summarise(answers: list, makespan: float) -> dict[str, Any]:
    """One (model, target) run's figures from its (target, TokenizeResult) answers."""
    rs = [r for _, r in answers]
    n = len(rs)
    l1s = [r.l1 for r in rs if r.l1 is not None]
    tokens = [r.num_tokens for r in rs]
    return {
        "images": n,
        "wall_s": makespan,
        "wall_ms_per_image": makespan / n * 1e3,
        "throughput": n / makespan,
        "compute_ms_mean": statistics.fmean(r.timings["compute_s"] for r in rs) * 1e3,
        "probes_per_image": statistics.fmean(r.iterations for r in rs),
        "pixel_decodes_per_image": statistics.fmean(r.pixel_decodes for r in rs),
        "tokens_mean": statistics.fmean(tokens),
        "tokens_median": statistics.median(tokens),
        "target_met_fraction": statistics.fmean(float(r.target_met) for r in rs),
        "l1_mean": statistics.fmean(l1s) if l1s else None,
    }


def table(rows: list[dict]) -> str:
    cells = [[h for _, h, _ in COLUMNS]]
    for r in rows:
        cells.append(["-" if r.get(k) is None else f.format(r[k]) for k, _, f in COLUMNS])
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    import asyncio

    import torch

    from ..engine import Engine, Target, parse_target
    from ..model.registry import resolve
    from . import _progress, engine_settings, live, workload

    t0 = time.perf_counter()
    models = parse_families(args.families)
    levels = parse_targets(args.targets)
    photos = workload.corpus(workload.load_folder(args.images), args.crops)
    settings = engine_settings(args, policy="continuous")
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    engines: dict[str, Any] = {}
    info: dict[str, dict] = {}
    work: dict[str, tuple[list, list]] = {}  # name -> (pixels, targets)
    try:
        for name, spec in models:
            loaded = resolve(spec)
            loaded.model.retry_stricter = args.retry_stricter  # before the engine reads the limits
            limits = loaded.limits
            if "max_l1" not in limits.accepts:
                raise FamiliesError(f"--families: {name} ({spec}) takes no max_l1 target (it accepts "
                                    f"{', '.join(limits.accepts)})")
            targets = [parse_target({"max_l1": x}, limits, Target()) for x in levels]
            pixels = list(workload.tensors(photos, limits.img_size, limits.resample))
            info[name] = {"spec": spec, "family": loaded.family.name, "fingerprint": loaded.fingerprint[:16],
                          "img_size": limits.img_size, "random_weights": spec.startswith("preset:"),
                          "max_probes": limits.max_probes, "limits": limits.info(),
                          "ladders": {str(t.max_l1): [{"probe": k, **limits.describe(k)} for k in t.ladder(limits)]
                                      for t in targets}}
            _progress(f"{name}: {spec} ({loaded.family.name} family, {limits.img_size} px) on {args.device} "
                      f"({args.dtype}); starting its engine (warm-up included)", t0)
            engines[name] = Engine(loaded, settings).start()
            work[name] = (pixels, targets)
        runs: dict[tuple[str, float], list[dict]] = {(n, x): [] for n, _ in models for x in levels}
        for rep in range(args.repeats):  # models interleaved per target: a slow spell hits them alike
            for i, x in enumerate(levels):
                for name, _ in models:
                    pixels, targets = work[name]
                    answers: list = []
                    res = asyncio.run(live.drive(engines[name], [(p, targets[i]) for p in pixels],
                                                 [0.0] * len(pixels), answers=answers))
                    got = summarise(answers, res["makespan_s"])
                    runs[(name, x)].append(got)
                    rnd = f" (round {rep + 1} of {args.repeats})" if args.repeats > 1 else ""
                    _progress(f"max_l1 {x:g}{rnd}, {name}: {got['wall_ms_per_image']:.2f} ms/img wall, "
                              f"{got['probes_per_image']:.2f} probes, {got['pixel_decodes_per_image']:.2f} "
                              f"decodes, {got['tokens_mean']:.1f} tokens per image, "
                              f"{got['target_met_fraction']:.0%} met", t0)
    finally:
        for eng in engines.values():
            eng.shutdown()
    rows = []
    for x in levels:
        for name, _ in models:
            rs = runs[(name, x)]
            mid = sorted(rs, key=lambda r: r["wall_s"])[(len(rs) - 1) // 2]  # the median round by wall time
            rows.append({"model": name, "family": info[name]["family"], "img_size": info[name]["img_size"],
                         "max_l1": x, **mid, "wall_ms_per_image_runs": [r["wall_ms_per_image"] for r in rs]})
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "note": RANDOM_WEIGHTS_NOTE,
        "random_weights": [n for n, _ in models if info[n]["random_weights"]],
        "machine": {"device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "cpu": platform.processor() or platform.machine(),
                    "gpu": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else None,
                    "loadavg_1m_before": load0, "loadavg_1m_after": load1},
        "settings": {"dtype": args.dtype, "max_batch": args.max_batch, "batch_mode": args.batch_mode,
                     "halting": not args.no_halting, "admission": args.admission, "compile": args.compile,
                     "retry_stricter": args.retry_stricter, "repeats": args.repeats, "policy": "continuous",
                     "saturation": "every image queued at once"},
        "workload": {"images": str(args.images), "corpus_images": len(photos), "targets_max_l1": levels},
        "models": info,
        "rows": rows,
    }


def main(args: argparse.Namespace) -> int:
    report = run(args)
    print()
    print(table(report["rows"]))
    print(f"note: {report['note']}" + (f" (random weights here: {', '.join(report['random_weights'])})"
                                       if report["random_weights"] else ""))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0
