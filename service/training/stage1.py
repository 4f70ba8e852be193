"""Stage 1: the base VQGAN (same architecture family as the published MaskGIT VQGAN, scaled down).

Loss: L1 + MSE on pixels, VQ codebook + 0.25 commitment on the raw-Euclidean codebook the serving
code uses. Half of every batch is decoded from a *soft* code (a temperature softmax over code
distances times the codebook) instead of the nearest code, because ALIT reconstructs from
softmax-weighted codes: the decoder must turn mixtures of codes into sensible pictures.
Codes unused for 50 steps are re-seeded from current encoder outputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..model.config import VQGANConfig
from ..model.vqgan import VQGAN
from .common import Log, autocast, exact, lr_at, on, resume, save_state, seed_all, set_lr
from .data import to_tensor


def step_generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + salt) % (1 << 62))


def distances(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """(B, C, g, g) encoder output -> (B*g*g, V) squared distances to the codebook rows."""
    with exact(z):
        flat = z.float().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        cb = codebook.float()
        return flat.pow(2).sum(1, keepdim=True) + cb.pow(2).sum(1) - 2 * flat @ cb.t()


def vq_forward(vq: VQGAN, x: torch.Tensor, soft_frac: float, gen: torch.Generator):
    z = vq.encoder(x)
    b, c, g, _ = z.shape
    cb = vq.codebook
    d = distances(z, cb)
    idx = d.argmin(1)
    q = cb[idx].view(b, g, g, c).permute(0, 3, 1, 2)
    vq_loss = F.mse_loss(q, z.detach()) + 0.25 * F.mse_loss(z, q.detach())
    code = z + (q - z).detach()  # straight-through
    n_soft = int(round(b * soft_frac))
    if n_soft:
        dn = d.view(b, g * g, -1)[:n_soft]
        dn = dn / dn.mean(-1, keepdim=True).clamp_min(1e-6)
        t = on(z.device, torch.exp(torch.empty(n_soft, 1, 1).uniform_(np.log(0.01), np.log(0.3), generator=gen)))
        soft = torch.softmax(-dn / t, -1) @ cb  # gradients reach the codebook and the encoder
        soft = soft.view(n_soft, g, g, c).permute(0, 3, 1, 2)
        code = torch.cat([soft, code[n_soft:]])
    return vq.decoder(code), vq_loss, idx


def evaluate_vqgan(vq: VQGAN, images: torch.Tensor) -> float:
    images = images.to(vq.codebook.device)
    with torch.no_grad():
        z, idx = vq.encode(images)
        q = vq.codebook[idx].view(z.shape[0], z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2)
        return (vq.decode(q) - images).abs().mean().item()


def train_vqgan(
    run_dir: Path, cfg: VQGANConfig, pool: np.ndarray, *, steps: int, batch: int, lr: float, seed: int,
    eval_images: torch.Tensor | None = None, ckpt_every: int = 100, log_every: int = 25, quiet: bool = False,
    device: torch.device | str = "cpu", bf16: bool = False,
) -> VQGAN:
    """Train (or resume) the base VQGAN on `device`, the forward under bfloat16 autocast when `bf16`.
    Returns it in eval mode, on `device`."""
    device = torch.device(device)
    run_dir = Path(run_dir)
    ckpt = run_dir / "stage1.pt"
    seed_all(seed)
    vq = VQGAN(cfg).to(device)
    opt = torch.optim.Adam(vq.parameters(), lr=lr, betas=(0.5, 0.9))
    start, state = resume(ckpt, vq, opt)
    usage = on(device, state["usage"]) if state is not None else torch.zeros(cfg.n_embed, device=device)
    log = Log(run_dir / "stage1.log.jsonl", steps, "stage1 vqgan", start, quiet)
    n = len(pool)
    for step in range(start, steps):
        gen = step_generator(seed, step, 1)
        x = on(device, to_tensor(pool[torch.randint(n, (batch,), generator=gen).numpy()]))
        if step == 0:  # codebook from encoder outputs of the first batch
            with torch.no_grad():
                z = vq.encoder(x).permute(0, 2, 3, 1).reshape(-1, cfg.embed_dim)
                vq.codebook.data.copy_(z[on(device, torch.randperm(len(z), generator=gen)[: cfg.n_embed])])
        set_lr(opt, lr_at(step, steps, lr, warmup=min(100, steps // 10 + 1)))
        vq.train()
        with autocast(device, bf16):
            recon, vq_loss, idx = vq_forward(vq, x, 0.5, gen)
            recon = recon.float()
            l1 = (recon - x).abs().mean()
            loss = l1 + F.mse_loss(recon, x) + vq_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vq.parameters(), 1.0)
        opt.step()
        usage += torch.bincount(idx, minlength=cfg.n_embed).float()
        if (step + 1) % 50 == 0:  # re-seed dead codes from this batch's encoder outputs
            dead = (usage == 0).nonzero()[:, 0]
            if len(dead):
                with torch.no_grad():
                    z = vq.encoder(x).permute(0, 2, 3, 1).reshape(-1, cfg.embed_dim)
                    pick = on(device, torch.randint(len(z), (len(dead),), generator=gen))
                    noise = on(device, torch.randn(len(dead), cfg.embed_dim, generator=gen))
                    vq.codebook.data[dead] = z[pick] + 0.01 * noise
            rec: dict[str, Any] = {"step": step + 1, "dead_codes": int(len(dead))}
            usage.zero_()
        else:
            rec = {"step": step + 1}
        if (step + 1) % log_every == 0 or step + 1 == steps:
            rec.update(loss=loss.item(), l1=l1.item(), vq=vq_loss.item())
            if eval_images is not None and ((step + 1) % (4 * log_every) == 0 or step + 1 == steps):
                vq.eval()
                rec["heldout_l1"] = evaluate_vqgan(vq, eval_images)
            log.write(rec)
            log.progress(step + 1, " ".join(f"{k}={v:.4f}" for k, v in rec.items() if isinstance(v, float)))
        if (step + 1) % ckpt_every == 0 or step + 1 == steps:
            save_state(ckpt, model=vq.state_dict(), opt=opt.state_dict(), step=step + 1, usage=usage)
    vq.eval()
    return vq
