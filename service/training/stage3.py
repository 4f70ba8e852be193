"""Stage 3 (optional): a short pixel-space fine-tune of the VQGAN *decoder* on the model's own
reconstructions. The latent encoder/decoder and the VQGAN encoder + codebook stay frozen, so the
tokens, the 2D codes and the halting probabilities do not change; only the picture drawn from the
softmax-weighted codes improves. The nearest-code path stays in the loss so the base VQGAN's own
reconstructions (the halting ground truth's picture) stay good.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..model.alit import ALIT
from .common import Log, autocast, lr_at, on, resume, save_state, seed_all, set_lr
from .data import to_tensor
from .forward import soft_code_grid, unroll
from .stage1 import step_generator


def finetune_decoder(
    run_dir: Path, model: ALIT, pool: np.ndarray, *, steps: int, batch: int, lr: float, seed: int,
    iters_per_image: int = 3, eval_images: torch.Tensor | None = None, quiet: bool = False,
    device: torch.device | str = "cpu", bf16: bool = False,
) -> ALIT:
    run_dir = Path(run_dir)
    device = torch.device(device)
    model.to(device)
    ckpt = run_dir / "stage3.pt"
    seed_all(seed)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    dec = model.vqgan.decoder
    for p in dec.parameters():
        p.requires_grad_(True)
    opt = torch.optim.Adam(dec.parameters(), lr=lr, betas=(0.9, 0.99))
    start, _ = resume(ckpt, dec, opt, key="decoder")
    log = Log(run_dir / "stage3.log.jsonl", steps, "stage3 decoder", start, quiet)
    vq = model.vqgan
    n = len(pool)
    for step in range(start, steps):
        gen = step_generator(seed, step, 3)
        x = on(device, to_tensor(pool[torch.randint(n, (batch,), generator=gen).numpy()]))
        with torch.no_grad():
            z, gt = vq.encode(x)
            with autocast(device, bf16):
                codes = [soft_code_grid(model, o.logits.float())
                         for o in unroll(model, x, z, gt, model.cfg.max_iters, gen=gen)]
            hard = vq.codebook[gt].view(z.shape[0], z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2)
        # each image: `iters_per_image` random iterations + its nearest-code map
        pick = torch.stack([torch.randperm(len(codes), generator=gen)[:iters_per_image] for _ in range(batch)])
        stack = torch.stack(codes, 1)  # (B, iters, C, g, g)
        chosen = stack[on(device, torch.arange(batch)[:, None]), on(device, pick)].flatten(0, 1)
        inp = torch.cat([chosen, hard])
        tgt = torch.cat([x.repeat_interleave(iters_per_image, 0), x])
        set_lr(opt, lr_at(step, steps, lr, warmup=max(1, min(50, steps // 10))))
        dec.train()
        with autocast(device, bf16):
            rec = dec(inp).float()
        l1 = (rec - tgt).abs().mean()
        loss = l1 + F.mse_loss(rec, tgt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dec.parameters(), 1.0)
        opt.step()
        loss_v, l1_v = torch.stack([loss.detach(), l1.detach()]).tolist()
        r = {"step": step + 1, "loss": loss_v, "l1": l1_v}
        if eval_images is not None and ((step + 1) % 50 == 0 or step + 1 == steps):
            from .stage2 import per_iteration_l1

            dec.eval()
            r["heldout_l1"] = per_iteration_l1(model, eval_images)
        log.step(step + 1, r, f"l1={l1_v:.4f}")
        if (step + 1) % 50 == 0 or step + 1 == steps:
            save_state(ckpt, decoder=dec.state_dict(), opt=opt.state_dict(), step=step + 1)
    dec.eval()
    for p in dec.parameters():
        p.requires_grad_(False)
    return model
