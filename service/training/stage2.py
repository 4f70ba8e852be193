"""Stage 2: latent distillation with all 8 iterations unrolled and 2D-token halting on.

The VQGAN from stage 1 is frozen (it provides z, the ground-truth 2D codes and the pixel decoder).
Per decoded iteration the loss is
    cross-entropy(logits, own VQGAN code)                       (no label smoothing: it would pull
                                                                 the soft code towards the mean code)
  + code MSE: |softmax(logits) @ codebook - codebook[gt]|^2 / var(codebook)
  + 1D VQ loss (codebook + 0.25 commitment) once the quantiser is on
and, at one sampled iteration per step and for half of the batch, a pixel L1 through the frozen
VQGAN decoder (the quantity the evaluation measures), weighted `pix_weight`.

Schedule (what made it learn on one CPU core in about an hour):
  phase A (`a_steps`): only 1 or 2 iterations unrolled (cheap: ~20 ms / image), the 1D quantiser
      bypassed (normalised continuous latents), so the encoder -> latents -> decoder routing forms;
  then the quantiser codebook is filled from current latents and switched on;
  phase B: K iterations unrolled, K = 8 with probability `p_full`, else uniform in 1..7, with the
      loss at every unrolled iteration, so every iteration is trained and the last ones often.
Continuation phases (2b, 2c: `a_steps=0, init=False, p_full=1, combine="ramp"`) unroll all 8
iterations on every step and weigh late iterations up.
Initialisation: `init_for_training` (structured positions; see its docstring). Without it the
reconstruction ignores the latents for a long time (probe notes; measured again in docs/training.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model.alit import ALIT
from .common import Log, autocast, lr_at, on, resume, save_state, seed_all, set_lr
from .data import to_tensor
from .forward import soft_code_grid, unroll
from .stage1 import step_generator


@dataclass
class Stage2Params:
    steps: int = 3000
    a_steps: int = 1000
    a_batch: int = 16
    b_batch: int = 8
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: int = 100
    p_full: float = 0.5
    pix_weight: float = 4.0
    pix_all: bool = False  # the pixel L1 at every unrolled iteration, not one sampled iteration
    code_weight: float = 1.0
    structured_init: bool = True
    ce_weight: float = 1.0
    eval_every: int = 100
    ckpt_every: int = 50
    # how the per-iteration losses of one step combine: "mean" (each step sums to one iteration's
    # worth; short unrolls then dominate the early iterations) or "sum" (every unrolled iteration
    # counts fully, so late iterations get as much weight as early ones) or "ramp" (weight k + 2 for
    # iteration k, normalised: the late iterations, which see the most tokens, weigh most)
    combine: str = "mean"
    init: bool = True  # False: continue from the weights passed in (a later phase)
    name: str = "stage2"  # checkpoint / log file stem


def _fourier(yx: torch.Tensor, freqs: tuple[float, ...]) -> torch.Tensor:
    """(N, 2) positions in [0, 1]^2 -> (N, 4 * len(freqs)) features whose dot product is a
    kernel peaked at equal positions: sum_f cos(w_f dy) + cos(w_f dx)."""
    out = []
    for f in freqs:
        w = math.pi * f
        out += [torch.cos(w * yx[:, 0]), torch.sin(w * yx[:, 0]), torch.cos(w * yx[:, 1]), torch.sin(w * yx[:, 1])]
    return torch.stack(out, 1)


# where the 32 latents of iteration k look first: a 4 x 8 grid of centres, shifted per iteration
_OFFSETS = [(0.5, 0.5), (0.0, 0.0), (0.0, 0.5), (0.5, 0.0), (0.25, 0.25), (0.75, 0.75), (0.25, 0.75), (0.75, 0.25)]


def latent_centres(tokens: int, iteration: int) -> torch.Tensor:
    rows = 4 if tokens % 4 == 0 else 1
    cols = tokens // rows
    oy, ox = _OFFSETS[iteration % len(_OFFSETS)]
    j = torch.arange(tokens)
    return torch.stack([((j // cols) + oy) / rows, ((j % cols) + ox) / cols], 1)


def cell_centres(grid: int) -> torch.Tensor:
    r = torch.arange(grid * grid)
    return torch.stack([((r // grid) + 0.5) / grid, ((r % grid) + 0.5) / grid], 1)


def init_for_training(model: ALIT, seed: int, structured: bool = True) -> None:
    """Re-initialise the latent-distillation part (not the VQGAN) for fast early learning.

    Linear/conv weights: std fan_in^-0.5 (the logit layer 0.02). With `structured`, positions are
    written into the embeddings as 2D Fourier features in a random 17-dim subspace (16 position
    dims + 1 "is a latent" dim), and every attention head's query/key projections read that
    subspace, so from step 0 each latent gathers the image region around its own centre (a 4 x 8
    grid, shifted each iteration) and each decoder grid cell reads the latents around it. Training
    is free to change all of it; it only removes the long plateau where attention is uniform and
    the reconstruction ignores the latents (probe notes)."""
    g = torch.Generator().manual_seed(seed + 17)
    skip = {id(model.decoder.ffn[2])}
    for name, m in model.named_modules():
        if name.startswith("base_tokenizer"):
            continue
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            fan_in = m.weight[0].numel()
            std = 0.02 if id(m) in skip else fan_in**-0.5
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * std)
                if m.bias is not None:
                    m.bias.zero_()
    if not structured:
        return
    cfg = model.cfg
    freqs = (1.0, 2.0, 3.0, 4.0)
    npos = 4 * len(freqs)
    T, iters, grid = cfg.tokens_per_iter, cfg.max_iters, cfg.grid_size

    def basis(width: int) -> torch.Tensor:
        q, _ = torch.linalg.qr(torch.randn(width, width, generator=g))
        return q[:, : npos + 1]  # (width, 17) orthonormal columns

    def small(*shape, width):
        return 0.1 * width**-0.5 * torch.randn(*shape, generator=g)

    def set_attention(blocks, B: torch.Tensor, alphas: list[float], type_bias: float) -> None:
        width = B.shape[0]
        for blk in blocks:
            heads = blk.attn.heads
            hd = width // heads
            w = blk.attn.in_proj_weight
            with torch.no_grad():
                for h in range(heads):
                    a = alphas[h % len(alphas)]
                    n = min(hd, B.shape[1])
                    for part in (0, 1):  # query, key
                        rows = slice(part * width + h * hd, part * width + (h + 1) * hd)
                        block = 0.3 * torch.randn(hd, width, generator=g) * width**-0.5
                        block[:n] += a * B[:, :n].t()
                        w[rows] = block
                    # queries carry a constant on the "is a latent" coordinate: + attract, - repel
                    if n > npos:
                        blk.attn.in_proj_bias[h * hd + npos] = type_bias

    with torch.no_grad():
        cells = _fourier(cell_centres(grid), freqs) / 2  # norm ~1.4
        # encoder
        w = cfg.encoder_width
        Be = basis(w)
        model.encoder_positional_embedding[1:] = cells @ Be[:, :npos].t() + small(grid * grid, w, width=w)
        model.encoder_positional_embedding[:1] = small(1, w, width=w)
        model.encoder_class_embedding.copy_(small(1, w, width=w))
        model.encoder_mask_token.copy_(small(1, 1, w, width=w))
        model.latent_tokens.copy_(small(T, w, width=w))
        model.latent_token_positional_embedding.copy_(small(T, w, width=w))
        for k in range(iters):
            f = _fourier(latent_centres(T, k), freqs) / 2
            model.timestep_embedding[k] = f @ Be[:, :npos].t() + Be[:, npos] + small(T, w, width=w)
        set_attention(model.encoder.transformer, Be, [1.2, 0.7], type_bias=-8.0)
        # decoder
        dw = cfg.decoder_width
        Bd = basis(dw)
        model.decoder_positional_embedding[1:] = cells @ Bd[:, :npos].t() + small(grid * grid, dw, width=dw)
        model.decoder_positional_embedding[:1] = small(1, dw, width=dw)
        model.decoder_class_embedding.copy_(small(1, dw, width=dw))
        model.decoder_mask_token.copy_(small(1, 1, dw, width=dw))
        lpe = model.decoder.latent_token_positional_embedding
        for k in range(min(iters, lpe.shape[0] // T)):
            f = _fourier(latent_centres(T, k), freqs) / 2
            lpe[k * T : (k + 1) * T] = f @ Bd[:, :npos].t() + Bd[:, npos] + small(T, dw, width=dw)
        set_attention(model.decoder.transformer, Bd, [1.2, 0.8], type_bias=12.0)
        model.decoder.decoder_embed.weight.mul_(0.25)  # positions, not content, steer attention at first


def fill_codebook(model: ALIT, prequant: torch.Tensor, gen: torch.Generator) -> None:
    z = F.normalize(prequant.detach().float().reshape(-1, prequant.shape[-1]), dim=-1)
    v = model.quantize.embedding.weight.shape[0]
    pick = on(z.device, torch.randint(len(z), (v,), generator=gen))
    with torch.no_grad():
        noise = on(z.device, torch.randn(v, z.shape[1], generator=gen))
        model.quantize.embedding.weight.copy_(z[pick] + 0.02 * noise)


def trainable_parameters(model: ALIT) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if not n.startswith("base_tokenizer")]


@torch.no_grad()
def per_iteration_l1(model: ALIT, images: torch.Tensor, halting: bool = True, quantize: bool = True) -> list[float]:
    """Mean held-out L1 after each iteration, through the differentiable path run without grad."""
    model.eval()
    images = images.to(model.vqgan.codebook.device)
    z, gt = model.vqgan.encode(images)
    gen = torch.Generator().manual_seed(0)
    out = []
    for o in unroll(model, images, z, gt, model.cfg.max_iters, quantize=quantize, halting=halting, gen=gen):
        rec = model.vqgan.decode(soft_code_grid(model, o.logits))
        out.append((rec - images).abs().mean().item())
    return out


def train_latents(
    run_dir: Path, model: ALIT, pool: np.ndarray, P: Stage2Params, *, seed: int,
    eval_images: torch.Tensor | None = None, quiet: bool = False,
    device: torch.device | str = "cpu", bf16: bool = False,
) -> ALIT:
    """Train (or resume) phase `P` on `device`, the forward under bfloat16 autocast when `bf16`.
    Returns the model in eval mode, on `device`."""
    run_dir = Path(run_dir)
    device = torch.device(device)
    ckpt = run_dir / f"{P.name}.pt"
    seed_all(seed)
    if P.init and not ckpt.is_file():  # initialised on the CPU (its draws are CPU draws), then moved
        init_for_training(model.cpu(), seed, P.structured_init)
    model.to(device)
    vq = model.vqgan
    vq.eval()
    for p in vq.parameters():
        p.requires_grad_(False)
    params = trainable_parameters(model)
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": P.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=P.lr, betas=(0.9, 0.99),
    )
    start, _ = resume(ckpt, model, opt)
    cb = vq.codebook.detach()
    cb_var = cb.var(0).sum()
    log = Log(run_dir / f"{P.name}.log.jsonl", P.steps, P.name, start, quiet)
    n = len(pool)
    for step in range(start, P.steps):
        stream = {"stage2": 2, "stage2b": 20, "stage2c": 21, "stage2d": 23, "stage2e": 24}.get(P.name, 22)
        gen = step_generator(seed, step, stream)
        phase_a = step < P.a_steps
        if phase_a:
            K = 1 if torch.rand((), generator=gen) < 0.7 else 2
            batch = P.a_batch
        else:
            full = torch.rand((), generator=gen) < P.p_full
            K = model.cfg.max_iters if full else int(torch.randint(1, model.cfg.max_iters, (), generator=gen))
            batch = P.b_batch
        x = on(device, to_tensor(pool[torch.randint(n, (batch,), generator=gen).numpy()]))
        with torch.no_grad():  # float32: the ground-truth codes are a nearest-code search
            z, gt = vq.encode(x)
        quantize = not phase_a
        if step == P.a_steps and P.a_steps > 0:
            # switch the 1D quantiser on: codebook from the current latents
            with torch.no_grad(), autocast(device, bf16):
                outs = list(unroll(model, x, z, gt, model.cfg.max_iters, quantize=False, halting=False, gen=gen))
            fill_codebook(model, torch.cat([o.prequant.reshape(-1, o.prequant.shape[-1]) for o in outs]), gen)
        set_lr(opt, lr_at(step, P.steps, P.lr, P.warmup))
        model.train()
        pix_k = int(torch.randint(K, (), generator=gen))
        half = max(1, batch // 2)
        tgt = cb[gt]
        ce_t = code_t = vq_t = pix_t = torch.zeros((), device=device)
        loss = torch.zeros((), device=device)
        usage = []
        with autocast(device, bf16):
            for k, o in enumerate(unroll(model, x, z, gt, K, quantize=quantize, halting=True, gen=gen)):
                logits = o.logits.float()
                ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), gt.reshape(-1))
                soft = logits.softmax(-1) @ cb
                code = (soft - tgt).pow(2).sum(-1).mean() / cb_var
                term = P.ce_weight * ce + P.code_weight * code + o.vq_loss
                if k == pix_k or P.pix_all:
                    rec = vq.decode(soft_code_grid(model, o.logits[:half])).float()
                    pix = (rec - x[:half]).abs().mean()
                    term = term + P.pix_weight * pix
                    pix_t = pix.detach() if not P.pix_all else pix_t + pix.detach() / K
                if P.combine == "mean":
                    w = 1.0 / K
                elif P.combine == "sum":
                    w = 1.0 / model.cfg.max_iters
                else:  # "ramp": weight k + 2, normalised over the unrolled iterations
                    w = (k + 2) / sum(j + 2 for j in range(K))
                loss = loss + w * term
                ce_t = ce_t + ce.detach() / K  # tensors: one device sync per step, not three per iteration
                code_t = code_t + code.detach() / K
                vq_t = vq_t + o.vq_loss.detach() / K
                if o.ids is not None:
                    usage.append(o.ids.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if usage and (step + 1) % 25 == 0:  # re-seed 1D codes this step's batch did not use
            used = torch.zeros(model.quantize.embedding.weight.shape[0], dtype=torch.bool, device=device)
            used[torch.cat(usage)] = True
            dead = (~used).nonzero()[:, 0]
            if len(dead) > 0:
                with torch.no_grad():
                    zz = F.normalize(o.prequant.detach().float().reshape(-1, o.prequant.shape[-1]), dim=-1)
                    pick = on(device, torch.randint(len(zz), (len(dead),), generator=gen))
                    noise = on(device, torch.randn(len(dead), zz.shape[1], generator=gen))
                    model.quantize.embedding.weight[dead] = zz[pick] + 0.02 * noise
        loss_v, ce_v, code_v, vq_v, pix_v, gn_v = torch.stack(
            [loss.detach(), ce_t, code_t, vq_t, pix_t, gn.detach().float()]).tolist()
        row: dict[str, Any] = {"step": step + 1, "K": K, "loss": loss_v, "ce": ce_v, "code": code_v, "vq": vq_v,
                               "pix": pix_v, "pix_k": pix_k, "gnorm": gn_v}
        if eval_images is not None and ((step + 1) % P.eval_every == 0 or step + 1 == P.steps):
            curve = per_iteration_l1(model, eval_images, halting=True, quantize=not phase_a)
            row["heldout_l1"] = curve
        log.step(step + 1, row,
                 f"K={K} loss={loss_v:.3f} ce={ce_v:.3f} code={code_v:.3f} pix={pix_v:.4f}")
        if (step + 1) % P.ckpt_every == 0 or step + 1 == P.steps:
            save_state(ckpt, model=model.state_dict(), opt=opt.state_dict(), step=step + 1)
    model.eval()
    return model
