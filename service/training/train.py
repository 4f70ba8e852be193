"""`alit-serve train`: the whole default-model recipe, seeded and resumable.

    python -m service.training train --run runs/default --export service/weights
    python -m service.training train --device cuda --budget-minutes 10 --config gpu128 --corpus runs/corpus

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
import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..model.alit import ALIT
from ..model.checkpoint import export, load_model
from ..model.config import ALITConfig
from ..model.precision import strict_float32
from ..model.vqgan import VQGAN
from .budget import A_SHARE, PROBE_SHARE, Plan, StagePlan, plan_stage, probe, scaled_lr, shares, steps_for
from .common import resolve_device, setup_threads, use_bf16
from .data import HELDOUT_DIR, load_folder, pool_cached, to_tensor
from .recipe import CONFIGS, Recipe, quick_recipe
from .stage2 import Stage2Params


class Timer:
    """Wall time per stage, accumulated over resumed runs in RUN/times.json."""

    def __init__(self, path: Path):
        self.path = path
        self.times = json.loads(path.read_text()) if path.is_file() else {}

    def add(self, stage: str, seconds: float) -> None:
        self.times[stage] = self.times.get(stage, 0.0) + seconds
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.times, indent=1))


def build_stage2_model(config: ALITConfig, vqgan_state: dict, seed: int) -> ALIT:
    torch.manual_seed(seed)
    model = ALIT(config)
    model.vqgan.load_state_dict(vqgan_state)
    return model


def corpus_tag(corpus: Path | None) -> str:
    """A short identity of a corpus directory (its manifest's hash) for the pool's cache name."""
    if corpus is None:
        return ""
    manifest = Path(corpus) / "corpus.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"{corpus} holds no corpus.json: build it with `python -m service.training corpus`")
    return "_c" + hashlib.sha256(manifest.read_bytes()).hexdigest()[:10]


def training_pool(run_dir: Path, n: int, size: int, seed: int, corpus: Path | None, workers: int) -> np.ndarray:
    """The run's crop pool, cached as .npy in the run directory. One worker and no corpus gives the
    shipped model's pool exactly; with `workers` > 1 it is made in `workers` chunks of their own
    seeds (deterministic for a seed and a worker count, but a different pool)."""
    tag = corpus_tag(corpus) + (f"_w{workers}" if workers > 1 else "")
    return pool_cached(run_dir / f"pool_{n}_{size}_{seed}{tag}.npy", n, size, seed, corpus=corpus, workers=workers)


def make_plan(args: argparse.Namespace, recipe: Recipe, config: ALITConfig, pool: np.ndarray,
              device: torch.device, bf16: bool, started: float) -> Plan:
    """Measure each stage's step time (scratch directories, thrown away) and size the run to the budget."""
    from .stage1 import train_vqgan
    from .stage2 import train_latents
    from .stage3 import finetune_decoder

    budget = args.budget_minutes * 60
    t_plan = time.time()
    seed = recipe.seed
    vq_state = VQGAN(config.vqgan).state_dict()
    big = 10**9  # no periodic checkpoints or evaluations inside a probe

    def stage1(d: Path, steps: int, b: int):
        return train_vqgan(d, config.vqgan, pool, steps=steps, batch=b, lr=recipe.s1_lr, seed=seed, quiet=True,
                           ckpt_every=big, log_every=1, device=device, bf16=bf16)

    def stage2(phase_a: bool):
        def run(d: Path, steps: int, b: int):
            P = Stage2Params(steps=steps, a_steps=steps if phase_a else 0, a_batch=b, b_batch=b, p_full=1.0,
                             eval_every=big, ckpt_every=big)
            return train_latents(d, build_stage2_model(config, vq_state, seed), pool, P, seed=seed, quiet=True,
                                 device=device, bf16=bf16)
        return run

    def stage3(d: Path, steps: int, b: int):
        return finetune_decoder(d, build_stage2_model(config, vq_state, seed), pool, steps=steps, batch=b,
                                lr=recipe.s3_lr, seed=seed, quiet=True, device=device, bf16=bf16)

    log = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    log(f"[plan] budget {budget / 60:.1f} min on {device}; probing step times")
    # stage -> (its probe run, the recipe's batch, the recipe's learning rate)
    specs = {"stage1": (stage1, recipe.s1_batch, recipe.s1_lr),
             "stage2a": (stage2(True), recipe.s2.a_batch, recipe.s2.lr),
             "stage2": (stage2(False), recipe.s2.b_batch, recipe.s2.lr),
             "stage3": (stage3, recipe.s3_batch, recipe.s3_lr)}
    probed = {k: probe(run, base, device, max_seconds=PROBE_SHARE * budget) for k, (run, base, _) in specs.items()}
    seconds = shares(budget, time.time() - started)  # what is left after the data and the probes
    train_seconds = {**seconds, "stage2a": A_SHARE * seconds["stage2"], "stage2": (1 - A_SHARE) * seconds["stage2"]}
    stages = {k: plan_stage(probed[k], seconds=train_seconds[k], base_batch=base, lr=lr)
              for k, (_, base, lr) in specs.items()}
    b = stages["stage2"]  # 2b runs stage 2's full unroll: same step cost
    stages["stage2b"] = StagePlan(batch=b.batch, steps=steps_for(seconds["stage2b"], b.seconds_per_step),
                                  lr=scaled_lr(recipe.s2b.lr, b.batch, recipe.s2b.b_batch),
                                  seconds_per_step=b.seconds_per_step, probed=b.probed)
    for name, st in stages.items():
        log(f"[plan] {name}: batch {st.batch}, {st.steps} steps x {st.seconds_per_step:.3f} s, lr {st.lr:.2e} "
            f"(probed {', '.join(f'{k}: {v:.3f} s' for k, v in st.probed.items())})")
    log(f"[plan] probing took {time.time() - t_plan:.0f} s; {sum(seconds.values()):.0f} s left to train")
    return Plan(device=str(device), budget_seconds=budget, train_seconds=sum(seconds.values()), stages=stages,
                a_steps=stages["stage2a"].steps, a_batch=stages["stage2a"].batch)


def planned_recipe(recipe: Recipe, plan: Plan) -> Recipe:
    """The recipe with the plan's batch sizes, learning rates and step counts: stage 2 is phase A
    (plan.a_steps) then phase B; one continuation phase (2b) with late iterations weighted up."""
    st = plan.stages
    s2 = dataclasses.replace(recipe.s2, steps=plan.a_steps + st["stage2"].steps, a_steps=plan.a_steps,
                             a_batch=plan.a_batch, b_batch=st["stage2"].batch, lr=st["stage2"].lr,
                             warmup=min(recipe.s2.warmup, max(1, plan.a_steps // 5)),
                             eval_every=max(1, (plan.a_steps + st["stage2"].steps) // 5))
    s2b = dataclasses.replace(recipe.s2b, steps=st["stage2b"].steps, b_batch=st["stage2b"].batch, lr=st["stage2b"].lr,
                              warmup=min(recipe.s2b.warmup, max(1, st["stage2b"].steps // 10)),
                              eval_every=max(1, st["stage2b"].steps // 3))
    return dataclasses.replace(
        recipe, s1_steps=st["stage1"].steps, s1_batch=st["stage1"].batch, s1_lr=st["stage1"].lr, s2=s2, s2b=s2b,
        s2c=dataclasses.replace(recipe.s2c, steps=0), s2d=dataclasses.replace(recipe.s2d, steps=0),
        s3_steps=st["stage3"].steps, s3_batch=st["stage3"].batch, s3_lr=st["stage3"].lr)


def run(args: argparse.Namespace) -> int:
    t_start = time.time()
    try:
        device = resolve_device(args.device)
        bf16 = use_bf16(device, args.amp)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True  # training only; evaluation goes back to strict float32
        torch.backends.cudnn.allow_tf32 = True
    setup_threads(args.threads)
    config = CONFIGS[args.config]
    recipe = quick_recipe() if args.quick else Recipe()
    if args.seed is not None:
        recipe.seed = args.seed
    if args.pool is not None:
        recipe.pool_size = args.pool
    corpus = Path(args.corpus) if args.corpus else None
    run_dir = Path(args.run)
    run_dir.mkdir(parents=True, exist_ok=True)
    timer = Timer(run_dir / "times.json")
    size = config.img_size
    _, ev = load_folder(HELDOUT_DIR, size)
    eval_images = to_tensor(ev)
    quiet = args.quiet

    t = time.time()
    try:
        pool = training_pool(run_dir, recipe.pool_size, size, recipe.seed, corpus, args.data_workers)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    timer.add("data", time.time() - t)

    if args.budget_minutes:
        plan = Plan.load(run_dir / "plan.json")  # a resumed run keeps the plan it started with
        if plan is None:
            t = time.time()
            plan = make_plan(args, recipe, config, pool, device, bf16, started=t_start)
            plan.save(run_dir / "plan.json")
            timer.add("plan", time.time() - t)
        recipe = planned_recipe(recipe, plan)
    (run_dir / "recipe.json").write_text(json.dumps(
        {**recipe.to_dict(), "config": args.config, "corpus": args.corpus, "device": str(device), "bf16": bf16},
        indent=1))
    on_device: dict[str, Any] = {"device": device, "bf16": bf16}

    from .stage1 import train_vqgan

    t = time.time()
    vq = train_vqgan(run_dir, config.vqgan, pool, steps=recipe.s1_steps, batch=recipe.s1_batch,
                     lr=recipe.s1_lr, seed=recipe.seed, eval_images=eval_images, quiet=quiet, **on_device)
    timer.add("stage1", time.time() - t)
    if args.until == "1":
        return 0

    from .stage2 import train_latents

    t = time.time()
    model = build_stage2_model(config, vq.cpu().state_dict(), recipe.seed)
    model = train_latents(run_dir, model, pool, recipe.s2, seed=recipe.seed, eval_images=eval_images, quiet=quiet,
                          **on_device)
    timer.add("stage2", time.time() - t)
    for extra in (recipe.s2b, recipe.s2c, recipe.s2d):  # continuation phases, each with its own checkpoint
        if extra.steps > 0:
            t = time.time()
            model = train_latents(run_dir, model, pool, extra, seed=recipe.seed, eval_images=eval_images,
                                  quiet=quiet, **on_device)
            timer.add(extra.name, time.time() - t)
    if args.until == "2" or recipe.s3_steps <= 0:
        pass
    else:
        from .stage3 import finetune_decoder

        t = time.time()
        model = finetune_decoder(run_dir, model, pool, steps=recipe.s3_steps, batch=recipe.s3_batch,
                                 lr=recipe.s3_lr, seed=recipe.seed, eval_images=eval_images, quiet=quiet,
                                 **on_device)
        timer.add("stage3", time.time() - t)

    out = Path(args.export) if args.export else run_dir / "export"
    export(model.cpu(), out)
    loaded = load_model(out)  # the shipped directory must load strictly through the serving path
    from .evaluate import complexity_checks, per_iteration, vqgan_l1

    t = time.time()
    if device.type == "cuda":
        strict_float32()  # evaluation measures what the service returns: float32 without TF32, as served
    evaluated = loaded.model.to(device)  # evaluation through the serving step API, on the training device
    l1, psnr, _ = per_iteration(evaluated, eval_images, halting=True)
    l1_nh, _, _ = per_iteration(evaluated, eval_images, halting=False)
    metrics: dict[str, Any] = {
        "heldout_photos": {
            "mean_l1": l1.mean(0).tolist(), "mean_psnr": psnr.mean(0).tolist(),
            "mean_l1_no_halting": l1_nh.mean(0).tolist(),
            "vqgan_l1": float(vqgan_l1(evaluated, eval_images).mean()),
        },
        "checks": complexity_checks(evaluated, halting=True),
    }
    evaluated.cpu()
    timer.add("evaluate", time.time() - t)
    metrics["wall_seconds"] = timer.times
    metrics["device"] = str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    metrics["bf16"] = bf16
    metrics["threads"] = torch.get_num_threads()
    metrics["corpus"] = args.corpus
    if args.budget_minutes:
        metrics["budget_seconds"] = args.budget_minutes * 60
        metrics["this_invocation_seconds"] = time.time() - t_start
    metrics["fingerprint"] = loaded.fingerprint
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    from .card import model_card

    command = "python -m service.training " + " ".join(args.argv)
    (out / "MODEL_CARD.md").write_text(model_card(loaded, recipe, metrics, command, out))
    print(json.dumps({k: metrics[k] for k in ("heldout_photos", "wall_seconds", "fingerprint")}, indent=1))
    c = metrics["checks"]
    print(f"crops mean L1 {[f'{v:.4f}' for v in c['crop_mean_l1']]} ratio {c['crop_ratio_256_32']:.3f} "
          f"rho {c['rho_halting_vs_png']:.3f} (VQGAN {c['rho_vqgan_l1_vs_png']:.3f}) "
          f"flat {c['flat_halts_at']} noise {c['noise_halts_at']}")
    if args.budget_minutes:
        print(f"wall time {(time.time() - t_start) / 60:.1f} min for a budget of {args.budget_minutes:g} min")
    print(f"exported {out} (fingerprint {loaded.fingerprint})")
    return 0


def parser(prog: str, gpu_job: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=(GPU_JOB_DOC if gpu_job else __doc__).split("\n\n")[0])
    p.add_argument("--run", default="runs/gpu-job" if gpu_job else "runs/default",
                   help="checkpoints, logs, data cache, plan (a re-run resumes from here, on any device)")
    p.add_argument("--export", default=None if gpu_job else "service/weights",
                   help="where to write the trained model directory" + (" (default RUN/export)" if gpu_job else ""))
    p.add_argument("--config", choices=sorted(CONFIGS), default="gpu128" if gpu_job else "default",
                   help="model shape (service/training/recipe.py)")
    p.add_argument("--device", default="auto", help="auto (CUDA when torch sees it, else CPU), cpu, cuda, cuda:N")
    p.add_argument("--amp", choices=["auto", "on", "off"], default="auto",
                   help="bfloat16 autocast for forward passes: auto = on CUDA only")
    p.add_argument("--budget-minutes", type=float, default=10.0 if gpu_job else None,
                   help="size batches and step counts to this wall-clock budget (measured step times; RUN/plan.json)")
    p.add_argument("--corpus", default=None,
                   help="a corpus directory from `python -m service.training corpus` (added to the sample images)")
    p.add_argument("--pool", type=int, default=None, help="number of training crops (default: the recipe's)")
    p.add_argument("--data-workers", type=int, default=(os.cpu_count() or 1) if gpu_job else 1,
                   help="processes making the crop pool (1 = the shipped model's exact pool)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--threads", type=int, default=None if gpu_job else 1, help="torch CPU threads")
    p.add_argument("--until", choices=["1", "2", "3"], default="3", help="stop after this stage")
    p.add_argument("--quick", action="store_true", help="a few steps of every stage (smoke test)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


GPU_JOB_DOC = """`alit-serve gpu-job`: the whole GPU job in a given number of minutes: data, VQGAN, distillation,
export, evaluation.

    python -m service.training gpu-job --budget-minutes 10 [--corpus runs/corpus] [--run runs/gpu-job]

It is `train --config gpu128 --device auto --budget-minutes 10 --data-workers <all cores>` exporting to
RUN/export (never over service/weights: replacing the shipped model is a decision made on its metrics).
"""


def main(argv: list[str] | None = None, gpu_job: bool = False) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser("alit-serve gpu-job" if gpu_job else "alit-serve train", gpu_job).parse_args(argv)
    if args.budget_minutes is not None and args.budget_minutes <= 0:
        print("error: --budget-minutes must be positive", file=sys.stderr)
        return 2
    if args.export is None:
        args.export = str(Path(args.run) / "export")
    args.argv = ["gpu-job" if gpu_job else "train", *argv]
    return run(args)


def gpu_job_main(argv: list[str] | None = None) -> int:
    return main(argv, gpu_job=True)
