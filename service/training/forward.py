"""A differentiable ALIT forward for training: the same sub-modules and maths as the serving model.

`service/model/alit.py` runs inference under `torch.no_grad()` one image state at a time; training
needs the whole unrolled recurrence batched and differentiable. This module re-expresses exactly
the recurrence documented there (and in `tests/fixtures/alit-reference/PORTING_NOTES.md`):

    x_0 = ln_pre([cls, L2norm([z, patch_embed(img)])] + pos ++ latents + t_emb[0])
    per iteration k: h = blocks(x); ids = VQ(pre_quantizer_mlp(ln_post(h[latents])));
    logits = decoder(codes[ids]); halting masks 2D tokens whose own-code probability p >= threshold
    with probability p; x = ln_recursive(h ++ latents + t_emb[k+1]).

Only two things differ from serving, both training-only: the 1D quantiser is straight-through
(forward value = the normalised code, as served; gradient = identity to the normalised input), and
it can be bypassed (`quantize=False`) early in training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model.alit import ALIT
from .common import exact, on


@dataclass
class IterationOutput:
    logits: torch.Tensor  # (B, G, V)
    prequant: torch.Tensor  # (B, n, D) un-normalised quantiser inputs
    codes: torch.Tensor  # (B, n, D) what the decoder received
    ids: torch.Tensor | None  # (B, n) when quantised
    vq_loss: torch.Tensor
    masked: torch.Tensor  # (B, G) bool: 2D tokens masked after this iteration


def quantize_st(model: ALIT, prequant: torch.Tensor, beta: float = 0.25):
    """Straight-through 1D VQ on L2-normalised vectors (the serving quantiser's nearest code)."""
    z = F.normalize(prequant.float(), dim=-1)
    e = model.quantize.codes().float()
    with exact(z):  # the nearest-code search in float32 also under bfloat16 autocast
        d = z.pow(2).sum(-1, keepdim=True) + e.pow(2).sum(-1) - 2 * z @ e.t()
    ids = d.argmin(-1)
    q = e[ids]
    vq_loss = F.mse_loss(q, z.detach()) + beta * F.mse_loss(z, q.detach())
    return z + (q - z).detach(), ids, vq_loss, z


def decode(model: ALIT, codes: torch.Tensor) -> torch.Tensor:
    """(B, n, D) normalised 1D code vectors -> logits (B, G, V) over the VQGAN codebook."""
    cfg, dec = model.cfg, model.decoder
    b, n, _ = codes.shape
    two_d = torch.cat([model.decoder_class_embedding, model.decoder_mask_token[0].expand(cfg.num_image_tokens, -1)])
    two_d = (two_d + model.decoder_positional_embedding).expand(b, -1, -1)
    lat = dec.decoder_embed(codes) + dec.latent_token_positional_embedding[:n]
    x = dec.ln_pre(torch.cat([two_d, lat], dim=1))
    for blk in dec.transformer:
        x = blk(x)
    return dec.ffn(dec.ln_post(x[:, 1 : cfg.num_image_tokens + 1]))


def soft_code_grid(model: ALIT, logits: torch.Tensor) -> torch.Tensor:
    """Logits (B, G, V) -> softmax-weighted VQGAN code map (B, C, g, g), as `ALIT.reconstruct`."""
    g = model.cfg.grid_size
    code = logits.softmax(-1) @ model.vqgan.codebook
    return code.view(code.shape[0], g, g, -1).permute(0, 3, 1, 2)


def unroll(
    model: ALIT,
    images: torch.Tensor,
    z: torch.Tensor,
    gt: torch.Tensor,
    iters: int,
    *,
    quantize: bool = True,
    halting: bool = True,
    threshold: float | None = None,
    gen: torch.Generator | None = None,
):
    """Run `iters` iterations on a batch; yields one IterationOutput per iteration."""
    cfg = model.cfg
    g1 = cfg.num_image_tokens + 1
    thr = cfg.halting_threshold if threshold is None else threshold
    b = images.shape[0]
    tokens = model.image_tokens(images, z)
    cls = model.encoder_class_embedding.expand(b, 1, -1)
    img_part = torch.cat([cls, tokens], dim=1) + model.encoder_positional_embedding
    x = model.encoder_ln_pre(torch.cat([img_part, model._fresh_latents(0).expand(b, -1, -1)], dim=1))
    mask_tok = model.encoder_positional_embedding[1:] + model.encoder_mask_token[0]
    for k in range(iters):
        for blk in model.encoder.transformer:
            x = blk(x)
        pre = model.pre_quantizer_mlp(model.encoder_ln_post(x[:, g1:]))
        if quantize:
            codes, ids, vq_loss, _ = quantize_st(model, pre)
        else:
            codes, ids, vq_loss = F.normalize(pre, dim=-1), None, pre.new_zeros(())
        logits = decode(model, codes)
        masked = torch.zeros(b, cfg.num_image_tokens, dtype=torch.bool, device=x.device)
        if halting:
            with torch.no_grad():
                p = logits.float().softmax(-1).gather(-1, gt[..., None])[..., 0]
                u = on(p.device, torch.rand(p.shape, generator=gen))  # a CPU draw: the same on every device
                masked = (u < p) & (p >= thr)
            img = torch.where(masked[..., None], mask_tok.expand(b, -1, -1), x[:, 1:g1])
            x = torch.cat([x[:, :1], img, x[:, g1:]], dim=1)
        yield IterationOutput(logits=logits, prequant=pre, codes=codes, ids=ids, vq_loss=vq_loss, masked=masked)
        if k + 1 < cfg.max_iters:
            fresh = model._fresh_latents(k + 1).expand(b, -1, -1)
            x = model.encoder_ln_recursive(torch.cat([x, fresh], dim=1))
