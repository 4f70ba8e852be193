"""`alit-serve train`: the whole default-model recipe, seeded and resumable.

    python -m service.training train --run runs/default --export weights

runs, in order (each stage checkpoints into --run and resumes from there when re-run):
  data     24k random crops of the scikit-image / scikit-learn sample images (cached .npy)
  stage 1  the base VQGAN
  stage 2  latent distillation, all 8 iterations unrolled, 2D-token halting on
  stage 3  (optional) VQGAN-decoder fine-tune on the model's own soft codes
  export   model.safetensors + config.json + MODEL_CARD.md, loadable by `load_model(DIR)`
  evaluate per-iteration L1/PSNR on the held-out photos, crops, flat/noise checks -> metrics.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..model.alit import ALIT
from ..model.checkpoint import export, load_model
from .common import setup_threads
from .data import HELDOUT_DIR, load_folder, pool_cached, to_tensor
from .recipe import DEFAULT_CONFIG, Recipe, quick_recipe


class Timer:
    """Wall time per stage, accumulated over resumed runs in RUN/times.json."""

    def __init__(self, path: Path):
        self.path = path
        self.times = json.loads(path.read_text()) if path.is_file() else {}

    def add(self, stage: str, seconds: float) -> None:
        self.times[stage] = self.times.get(stage, 0.0) + seconds
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.times, indent=1))


def build_stage2_model(vqgan_state: dict, seed: int) -> ALIT:
    torch.manual_seed(seed)
    model = ALIT(DEFAULT_CONFIG)
    model.vqgan.load_state_dict(vqgan_state)
    return model


def run(args: argparse.Namespace) -> int:
    setup_threads(args.threads)
    recipe = quick_recipe() if args.quick else Recipe()
    if args.seed is not None:
        recipe.seed = args.seed
    run_dir = Path(args.run)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=1))
    timer = Timer(run_dir / "times.json")
    size = DEFAULT_CONFIG.img_size
    _, ev = load_folder(HELDOUT_DIR, size)
    eval_images = to_tensor(ev)
    quiet = args.quiet

    t = time.time()
    pool_file = run_dir / f"pool_{recipe.pool_size}_{size}_{recipe.seed}.npy"
    pool = pool_cached(pool_file, recipe.pool_size, size, recipe.seed)
    timer.add("data", time.time() - t)

    from .stage1 import train_vqgan

    t = time.time()
    vq = train_vqgan(run_dir, DEFAULT_CONFIG.vqgan, pool, steps=recipe.s1_steps, batch=recipe.s1_batch,
                     lr=recipe.s1_lr, seed=recipe.seed, eval_images=eval_images, quiet=quiet)
    timer.add("stage1", time.time() - t)
    if args.until == "1":
        return 0

    from .stage2 import train_latents

    t = time.time()
    model = build_stage2_model(vq.state_dict(), recipe.seed)
    model = train_latents(run_dir, model, pool, recipe.s2, seed=recipe.seed, eval_images=eval_images, quiet=quiet)
    timer.add("stage2", time.time() - t)
    for extra in (recipe.s2b, recipe.s2c, recipe.s2d):  # continuation phases, each with its own checkpoint
        if extra.steps > 0:
            t = time.time()
            model = train_latents(run_dir, model, pool, extra, seed=recipe.seed, eval_images=eval_images, quiet=quiet)
            timer.add(extra.name, time.time() - t)
    if args.until == "2" or recipe.s3_steps <= 0:
        pass
    else:
        from .stage3 import finetune_decoder

        t = time.time()
        model = finetune_decoder(run_dir, model, pool, steps=recipe.s3_steps, batch=recipe.s3_batch, lr=recipe.s3_lr,
                                 seed=recipe.seed, eval_images=eval_images, quiet=quiet)
        timer.add("stage3", time.time() - t)

    out = Path(args.export) if args.export else run_dir / "export"
    export(model, out)
    loaded = load_model(out)  # the shipped directory must load strictly through the serving path
    from .evaluate import complexity_checks, per_iteration, vqgan_l1

    t = time.time()
    l1, psnr, _ = per_iteration(loaded.model, eval_images, halting=True)
    l1_nh, _, _ = per_iteration(loaded.model, eval_images, halting=False)
    metrics: dict[str, Any] = {
        "heldout_photos": {
            "mean_l1": l1.mean(0).tolist(), "mean_psnr": psnr.mean(0).tolist(),
            "mean_l1_no_halting": l1_nh.mean(0).tolist(),
            "vqgan_l1": float(vqgan_l1(loaded.model, eval_images).mean()),
        },
        "checks": complexity_checks(loaded.model, halting=True),
    }
    timer.add("evaluate", time.time() - t)
    metrics["wall_seconds"] = timer.times
    metrics["fingerprint"] = loaded.fingerprint
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    from .card import model_card

    command = "python -m service.training train " + " ".join(args.argv)
    (out / "MODEL_CARD.md").write_text(model_card(loaded, recipe, metrics, command, out))
    print(json.dumps({k: metrics[k] for k in ("heldout_photos", "wall_seconds", "fingerprint")}, indent=1))
    c = metrics["checks"]
    print(f"crops mean L1 {[f'{v:.4f}' for v in c['crop_mean_l1']]} ratio {c['crop_ratio_256_32']:.3f} "
          f"rho {c['rho_halting_vs_png']:.3f} (VQGAN {c['rho_vqgan_l1_vs_png']:.3f}) "
          f"flat {c['flat_halts_at']} noise {c['noise_halts_at']}")
    print(f"exported {out} (fingerprint {loaded.fingerprint})")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="alit-serve train", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="runs/default", help="checkpoints, logs, data cache (resumes from here)")
    p.add_argument("--export", default="weights", help="where to write the trained model directory")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--until", choices=["1", "2", "3"], default="3", help="stop after this stage")
    p.add_argument("--quick", action="store_true", help="a few steps of every stage (smoke test)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    args = p.parse_args(argv)
    args.argv = argv
    return run(args)
