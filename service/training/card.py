"""MODEL_CARD.md for the trained default model, filled from the run's recipe and measured metrics."""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path

import torch

from .data import SOURCES


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _row(vals, fmt="{:.4f}") -> str:
    return " | ".join(fmt.format(v) for v in vals)


def corpus_lines(corpus: str | None) -> list[str]:
    """The Debian-package corpus's licences, when the run used one (`--corpus`)."""
    if not corpus:
        return []
    from .corpus import licence_lines

    return ["", f"Plus crops of the photographs and textures of the corpus `{Path(corpus).name}` "
            "(`python -m service.training corpus`, docs/training.md), from Debian packages:", "",
            *licence_lines(corpus)]


def model_card(loaded, recipe, metrics: dict, command: str, out: Path) -> str:
    c = loaded.config
    n_params = sum(t.numel() for t in loaded.model.state_dict().values())
    h = metrics["heldout_photos"]
    k = metrics["checks"]
    times = metrics.get("wall_seconds", {})
    total = sum(times.values())
    on_what = metrics.get("device", "cpu").replace("cpu", "one CPU core" if metrics.get("threads") == 1 else "CPU")
    if metrics.get("bf16"):
        on_what += ", bfloat16 autocast"
    tokens = [c.tokens_per_iter * (i + 1) for i in range(c.max_iters)]
    l1 = h["mean_l1"]
    lines = [
        f"# alit-serve default model (trained on {on_what}, demos and tests only)",
        "",
        "A small ALIT (adaptive-length image tokenizer) trained from scratch with this project's recipe",
        "(`service/training/`, `docs/training.md`). **Intended use: demos, tests, and showing the",
        "system's behaviour (simple images get fewer tokens) without a download. Not production",
        f"quality**: {c.img_size} px images, a small VQGAN, minutes of training on {on_what}. A published ALIT",
        "checkpoint replaces it through configuration (`ALIT_MODEL=/path/to/checkpoint`).",
        "",
        "| field | value |",
        "|---|---|",
        f"| model.safetensors sha256 | `{_sha(out / 'model.safetensors')}` |",
        f"| fingerprint (config + weights) | `{loaded.fingerprint}` |",
        f"| parameters | {n_params:,} |",
        f"| image size / patch / grid | {c.img_size} / {c.patch_size} / {c.grid_size}x{c.grid_size} |",
        f"| encoder / decoder | {c.encoder_width}w x {c.encoder_layers}L x {c.encoder_heads}h / "
        f"{c.decoder_width}w x {c.decoder_layers}L x {c.decoder_heads}h |",
        f"| 1D tokens | {c.tokens_per_iter} per iteration, {c.max_iters} iterations (up to {c.max_tokens}), "
        f"codebook {c.vq_codebook_size} x {c.vq_token_dim} |",
        f"| VQGAN | ch {c.vqgan.ch}, ch_mult {list(c.vqgan.ch_mult)}, {c.vqgan.num_res_blocks} res block(s), "
        f"codebook {c.vqgan.n_embed} x {c.vqgan.embed_dim}, {c.vqgan.num_groups} groups |",
        f"| halting threshold (2D tokens) | {c.halting_threshold} |",
        "",
        "## Command",
        "",
        "```bash",
        ".venv/bin/pip install scikit-image scikit-learn   # training data only",
        ("OMP_NUM_THREADS=1 " if metrics.get("device", "cpu") == "cpu" else "") + f".venv/bin/{command}",
        "```",
        "",
        f"Wall time on the build machine ({platform.machine()}, {on_what}, torch {torch.__version__}): "
        f"**{total / 60:.1f} min** in all ("
        + ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items()) + "). "
        "Seeded and resumable: re-running the command resumes from the checkpoints in `--run`.",
        "",
        "## Data and licences",
        "",
        "Training: random crops (log-uniform scale, random position, horizontal flips, tints for grey",
        f"images, mild colour jitter) of {len(SOURCES)} sample images that ship inside the scikit-image",
        f"and scikit-learn packages, resized to {c.img_size} px (PIL bicubic), plus 4 % synthetic flat-colour and",
        "linear-gradient images. Nothing downloaded. The 7 photos of",
        "`tests/fixtures/alit-reference/images/` are held out entirely (evaluation only).",
        "",
        "| package | file | licence |",
        "|---|---|---|",
    ] + [f"| {p} | {f} | {lic} |" for p, f, lic in SOURCES] + corpus_lines(metrics.get("corpus")) + [
        "",
        "The model weights are a derived work of these images; treat them as usable for demos and tests.",
        "",
        "## Recipe",
        "",
        "```json",
        json.dumps(recipe.to_dict(), indent=1),
        "```",
        "",
        "## Metrics (held-out, measured at export through the serving step API, halting on)",
        "",
        "| tokens | " + " | ".join(str(t) for t in tokens) + " |",
        "|---|" + "---|" * len(tokens),
        f"| 7 photos: mean L1 | {_row(l1)} |",
        f"| 7 photos: mean PSNR dB | {_row(h['mean_psnr'], '{:.2f}')} |",
        f"| 7 photos: mean L1, halting off | {_row(h['mean_l1_no_halting'])} |",
        f"| {k['crops']} crops: mean L1 | {_row(k['crop_mean_l1'])} |",
        "",
        f"- Base VQGAN's own L1 on the 7 photos (ceiling): {h['vqgan_l1']:.4f}.",
        f"- L1 at 256 / L1 at 32: photos {l1[-1] / l1[0]:.3f}, crops {k['crop_ratio_256_32']:.3f} (bar: <= 0.8).",
        f"- Crops (PNG {k['png_bytes_min']}..{k['png_bytes_max']} bytes), L1 threshold {k['threshold']:.4f}: "
        f"{k['distinct_halting_iterations']} distinct halting iterations, Spearman rho(halting iteration, PNG size) "
        f"= {k['rho_halting_vs_png']:.3f}; base VQGAN rho(L1, PNG size) = {k['rho_vqgan_l1_vs_png']:.3f} (ceiling).",
        f"- Flat image halts at iteration {k['flat_halts_at']} (L1 {k['flat_l1'][0]:.4f}); uniform noise "
        f"{'meets' if k['noise_ever_meets_threshold'] else 'never meets'} the threshold (L1 "
        f"{min(k['noise_l1']):.3f} at best; the reference rule then returns its lowest-L1 iteration, "
        f"{k['noise_halts_at']}).",
        "",
        "## Status against issue 9's acceptance bar",
        "",
        f"- Mean L1 falls at every iteration: photos {'yes' if all(b < a for a, b in zip(l1, l1[1:])) else 'no'}, "
        f"crops {'yes' if k['crop_l1_falls_every_iteration'] else 'no'}.",
        f"- L1@256 <= 0.8 x L1@32: photos {'yes' if l1[-1] <= 0.8 * l1[0] else 'no'} ({l1[-1] / l1[0]:.3f}), "
        f"crops {'yes' if k['crop_ratio_256_32'] <= 0.8 else 'no'} ({k['crop_ratio_256_32']:.3f}).",
        f"- Spearman rho >= 0.5 (halting iteration vs PNG size, >= 4 distinct halting iterations): "
        f"{'yes' if k['rho_halting_vs_png'] >= 0.5 and k['distinct_halting_iterations'] >= 4 else 'no'} "
        f"({k['rho_halting_vs_png']:.3f}, {k['distinct_halting_iterations']} distinct).",
        f"- Flat image halts at iteration 1: {'yes' if k['flat_halts_at'] == 1 else 'no'}; noise never meets "
        f"the threshold: {'yes' if not k['noise_ever_meets_threshold'] else 'no'}.",
        "",
        "Curves, what was tried and what it would take: `docs/training.md`.",
        "",
        "Re-measure with `python -m service.training evaluate tests/fixtures/alit-reference/images "
        "--model service/weights --checks`.",
        "",
    ]
    return "\n".join(lines)
