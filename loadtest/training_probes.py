"""CPU probes for sizing the default model (issue 25, item 3), at reduced scale (64 px), side by side.

    python loadtest/training_probes.py vqgan  --minutes 10 --out docs/probes_vqgan.json
    python loadtest/training_probes.py stage2 --minutes 12 --out docs/probes_stage2.json

`vqgan`: base-VQGAN variants trained at the same time, one process and one thread each, for the same
wall-clock minutes; held-out L1 (the 7 photos, nearest codes) every 100 steps with the minute it was
reached. Which base VQGAN gets the lowest L1 ceiling per training minute.
`stage2`: stage-2 recipes continued from the shipped model (service/weights) side by side; the
held-out L1 after 32 ... 256 tokens every 25 steps. Which recipe makes later tokens lower the L1.
Every variant shares the same LR schedule per step, so they differ only in what the variant names.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

def _vq(ch: int, ch_mult: tuple[int, ...], res: int, codes: int) -> dict:
    return {"ch": ch, "ch_mult": ch_mult, "num_res_blocks": res, "n_embed": codes, "num_groups": 8}


VQGAN_VARIANTS = {
    "shipped ch32 (1,1,2) 1res cb256": _vq(32, (1, 1, 2), 1, 256),
    "wide ch64 (1,1,2) 1res cb256": _vq(64, (1, 1, 2), 1, 256),
    "codebook ch32 (1,1,2) 1res cb1024": _vq(32, (1, 1, 2), 1, 1024),
    "deep ch32 (1,2,2) 2res cb1024": _vq(32, (1, 2, 2), 2, 1024),
}

STAGE2_VARIANTS = {
    "ramp (shipped 2b-2d recipe)": {},
    "ramp + pixel L1 at every iteration": {"pix_all": True},
}


def _vqgan(name: str, run: str, kw: dict) -> None:
    import torch

    from service.model.config import VQGANConfig
    from service.training.data import HELDOUT_DIR, load_folder, pool_cached, to_tensor
    from service.training.stage1 import train_vqgan

    torch.set_num_threads(1)
    cfg = VQGANConfig(z_channels=32, embed_dim=32, resolution=64, **kw)
    pool = pool_cached(Path(run).parent / "pool_24000_64_0.npy", 24000, 64, 0)
    _, ev = load_folder(HELDOUT_DIR, 64)
    train_vqgan(Path(run), cfg, pool, steps=1500, batch=16, lr=1e-3, seed=0, eval_images=to_tensor(ev), quiet=True)


def _stage2(name: str, run: str, kw: dict) -> None:
    import torch

    from service.model.checkpoint import load_model
    from service.training.data import HELDOUT_DIR, load_folder, pool_cached, to_tensor
    from service.training.stage2 import Stage2Params, train_latents

    torch.set_num_threads(1)
    model = load_model(ROOT / "service" / "weights").model
    pool = pool_cached(Path(run).parent / "pool_24000_64_0.npy", 24000, 64, 0)
    _, ev = load_folder(HELDOUT_DIR, 64)
    P = Stage2Params(steps=600, a_steps=0, b_batch=8, lr=5e-4, warmup=20, p_full=1.0, combine="ramp", init=False,
                     name="probe", eval_every=25, ckpt_every=25, **kw)
    train_latents(Path(run), model, pool, P, seed=7, eval_images=to_tensor(ev), quiet=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=["vqgan", "stage2"])
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--runs", default="runs/probes")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    variants, target, log_name = ((VQGAN_VARIANTS, _vqgan, "stage1.log.jsonl") if args.kind == "vqgan"
                                  else (STAGE2_VARIANTS, _stage2, "probe.log.jsonl"))
    base = Path(args.runs) / args.kind
    base.mkdir(parents=True, exist_ok=True)
    from service.training.data import pool_cached

    pool_cached(base / "pool_24000_64_0.npy", 24000, 64, 0)  # once, before the clocks start
    os.environ["OMP_NUM_THREADS"] = "1"
    ctx = mp.get_context("spawn")
    procs, seen = {}, {}
    t0 = time.time()
    for i, (name, kw) in enumerate(variants.items()):
        run = base / f"v{i}"
        for f in run.glob("*"):
            f.unlink()
        procs[name] = ctx.Process(target=target, args=(name, str(run), kw), daemon=True)
        procs[name].start()
        seen[name] = []
    while time.time() - t0 < args.minutes * 60 and any(pr.is_alive() for pr in procs.values()):
        time.sleep(2)
        for i, name in enumerate(variants):
            log = base / f"v{i}" / log_name
            if not log.is_file():
                continue
            lines = log.read_text().splitlines()
            for line in lines[len(seen[name]):]:
                rec = json.loads(line)
                rec["minute"] = round((time.time() - t0) / 60, 2)
                seen[name].append(rec)
    for pr in procs.values():
        pr.kill()
    result = {"kind": args.kind, "minutes": args.minutes, "threads_per_variant": 1, "variants": {
        name: [{k: r[k] for k in ("step", "minute", "heldout_l1") if k in r} for r in recs if "heldout_l1" in r]
        for name, recs in seen.items()}}
    Path(args.out).write_text(json.dumps(result, indent=1))
    for name, rows in result["variants"].items():
        last = rows[-1] if rows else {}
        print(f"{name:40s} steps {last.get('step')} at {last.get('minute')} min: heldout L1 {last.get('heldout_l1')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
