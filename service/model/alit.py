"""ALIT: adaptive-length image tokenization via recurrent allocation (Duggal et al., ICLR 2025).

One readable file for the network and its recurrence. Parameter names and shapes match the
published state dicts, so official checkpoints load with `strict=True`.

The recurrence, for iteration k = 0 .. max_iters-1 of one image:

    x_0   = ln_pre([cls, image tokens] + pos  ++  latents + t_emb[0])
    h_k   = transformer(x_k)                              # all tokens attend to all
    ids_k = VQ(pre_quantizer_mlp(ln_post(h_k[latents])))  # all 32(k+1) latents re-quantised
    (halting) p = P(decoder(ids_k) predicts the image's own VQGAN code at each grid cell);
              cells with p >= threshold are replaced, with probability p, by pos + mask_token
    x_k+1 = ln_recursive(h_k ++ latents + t_emb[k+1])

The step API (`prepare`, `advance`, `decode_logits`, `reconstruct`) keeps one `ImageState` per
image, so an engine can admit, advance and retire images independently; images at different
iterations advance in one call: packed (every token of every image through each linear layer at
once, attention per image), or grouped into same-length cohorts, or padded with attention masks.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Literal, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ALITConfig
from .vqgan import VQGAN

BatchMode = Literal["packed", "cohort", "padded"]


# ----------------------------------------------------------------------------------------------
# Transformer: pre-LN blocks with the parameters of nn.MultiheadAttention, run through fused SDPA
# ----------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention keeping nn.MultiheadAttention's packed parameter layout."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, w = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).split(w, dim=-1)
        q, k, v = (t.view(b, n, self.heads, w // self.heads).transpose(1, 2) for t in (q, k, v))
        mask = None if key_mask is None else key_mask[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(y.transpose(1, 2).reshape(b, n, w))

    def attend_packed(self, qkv: torch.Tensor, groups: list[tuple[int, int, int]]) -> torch.Tensor:
        """`qkv` (N, 3W): the projections of several sequences back to back; `groups` lists (start
        row, count, length) runs of same-length sequences. Attention per run; (N, W) before out_proj."""
        w = qkv.shape[-1] // 3
        d = w // self.heads
        ys = []
        for start, count, length in groups:
            part = qkv[start : start + count * length].view(count, length, 3 * w)
            q, k, v = (t.view(count, length, self.heads, d).transpose(1, 2) for t in part.split(w, dim=-1))
            y = F.scaled_dot_product_attention(q, k, v)
            ys.append(y.transpose(1, 2).reshape(count * length, w))
        return ys[0] if len(ys) == 1 else torch.cat(ys)


class MLP(nn.Module):
    def __init__(self, width: int, ratio: float):
        super().__init__()
        self.c_fc = nn.Linear(width, int(width * ratio))
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(int(width * ratio), width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp_ratio)
        self.token_fns: tuple[Callable, Callable] = (attention_inputs, after_attention)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), key_mask)
        return x + self.mlp(self.ln_2(x))

    def forward_packed(self, x: torch.Tensor, groups: list[tuple[int, int, int]]) -> torch.Tensor:
        """`x` (N, W): several sequences back to back (see `pack`). Everything but attention works per
        token, in the two functions of `token_fns` (plain, or compiled: model/compile.py)."""
        before, after = self.token_fns
        return after(self, x, self.attn.attend_packed(before(self, x), groups))


def attention_inputs(blk: Block, x: torch.Tensor) -> torch.Tensor:
    """A packed block's first per-token part: ln_1 and the q/k/v projection, (N, 3W)."""
    return F.linear(blk.ln_1(x), blk.attn.in_proj_weight, blk.attn.in_proj_bias)


def after_attention(blk: Block, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A packed block's second per-token part: out projection, residual, ln_2, MLP, residual."""
    x = x + blk.attn.out_proj(y)
    return x + blk.mlp(blk.ln_2(x))


Seq = torch.Tensor | tuple[torch.Tensor, ...]  # a sequence, or the pieces it is the concatenation of


def _len(s: Seq) -> int:
    return s.shape[0] if isinstance(s, torch.Tensor) else sum(p.shape[0] for p in s)


def pack(seqs: list[Seq]) -> tuple[torch.Tensor, list[tuple[int, int, int]], list[slice]]:
    """Concatenate (L_i, W) sequences (or their pieces), grouped by length, in ONE copy: (packed
    (N, W), runs of (start, count, length) for `forward_packed`, each sequence's rows)."""
    order = sorted(range(len(seqs)), key=lambda i: _len(seqs[i]))
    rows: list[slice] = [slice(0)] * len(seqs)
    groups: list[tuple[int, int, int]] = []
    start = 0
    for i in order:
        n = _len(seqs[i])
        if groups and groups[-1][2] == n:
            s0, c, _ = groups[-1]
            groups[-1] = (s0, c + 1, n)
        else:
            groups.append((start, 1, n))
        rows[i] = slice(start, start + n)
        start += n
    pieces: list[torch.Tensor] = []
    for i in order:
        s = seqs[i]
        pieces += [s] if isinstance(s, torch.Tensor) else list(s)
    packed = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    return packed, groups, rows


def run_blocks(blocks: nn.ModuleList, seqs: list[Seq], mode: BatchMode) -> list[torch.Tensor]:
    """Run a list of (L_i, W) sequences of possibly different lengths through `blocks`.

    "packed": every sequence's tokens concatenated (no padding), each LayerNorm / linear / MLP one
    call over all of them, attention one call per run of same-length sequences. "cohort": one
    batched call per distinct length. "padded": one call, keys beyond each sequence's length masked
    out. Either way each sequence's result depends only on itself.
    """

    def run(x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        for blk in blocks:
            x = blk(x, key_mask)
        return x

    if mode == "packed":
        x, groups, rows = pack(seqs)
        for blk in blocks:
            x = cast(Block, blk).forward_packed(x, groups)
        return [x[r] for r in rows]
    full = [s if isinstance(s, torch.Tensor) else torch.cat(s) for s in seqs]
    lengths = [s.shape[0] for s in full]
    out: list[torch.Tensor] = [None] * len(full)  # type: ignore[list-item]
    if mode == "padded" and len(set(lengths)) > 1:
        lmax = max(lengths)
        x = torch.nn.utils.rnn.pad_sequence(full, batch_first=True)
        key_mask = torch.arange(lmax, device=x.device)[None, :] < torch.tensor(lengths, device=x.device)[:, None]
        y = run(x, key_mask)
        return [y[i, :n] for i, n in enumerate(lengths)]
    by_len: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        by_len.setdefault(n, []).append(i)
    for idx in by_len.values():
        y = run(torch.stack([full[i] for i in idx]))
        for j, i in enumerate(idx):
            out[i] = y[j]
    return out


class LatentQuantizer(nn.Module):
    """The 1D vector quantiser: nearest code by distance between L2-normalised vectors."""

    def __init__(self, codebook_size: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, dim)
        nn.init.uniform_(self.embedding.weight, -1 / codebook_size, 1 / codebook_size)

    def codes(self) -> torch.Tensor:
        """The L2-normalised codebook (what the decoder receives), float32."""
        return F.normalize(self.embedding.weight.float(), dim=-1)

    def forward(self, prequant: torch.Tensor) -> torch.Tensor:
        """(..., D) quantiser inputs -> (...) code ids. Always float32, as the reference."""
        z = F.normalize(prequant.float(), dim=-1)
        e = self.codes()
        d = z.pow(2).sum(-1, keepdim=True) + e.pow(2).sum(-1) - 2 * z @ e.t()
        return d.argmin(dim=-1)


class LatentEncoder(nn.Module):
    """The reference `Encoder`: only the blocks; the LayerNorms live on the ALIT module."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.transformer = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(layers))


class LatentDecoder(nn.Module):
    """1D tokens -> logits over the VQGAN vocabulary at every 2D grid position."""

    def __init__(self, cfg: ALITConfig):
        super().__init__()
        w = cfg.decoder_width
        self.decoder_embed = nn.Linear(cfg.vq_token_dim, w)
        self.ln_pre = nn.LayerNorm(w)
        self.transformer = nn.ModuleList(
            Block(w, cfg.decoder_heads, cfg.mlp_ratio) for _ in range(cfg.decoder_layers)
        )
        self.ln_post = nn.LayerNorm(w)
        self.ffn = nn.Sequential(nn.Linear(w, 2 * w), nn.Tanh(), nn.Linear(2 * w, cfg.vqgan.n_embed))
        self.latent_token_positional_embedding = nn.Parameter(
            w**-0.5 * torch.randn(cfg.decoder_max_latent_tokens, w)
        )


# ----------------------------------------------------------------------------------------------
# Per-image recurrent state
# ----------------------------------------------------------------------------------------------


@dataclass
class ImageState:
    """Everything one image carries between iterations. `x` is the next transformer input."""

    image: torch.Tensor  # (3, H, W) preprocessed pixels in [0, 1]
    gt_indices: torch.Tensor  # (G,) the image's own VQGAN codes: the halting "ground truth"
    seed: int  # per-image seed for the halting draws (content-derived by default)
    x: torch.Tensor | None  # (257 + 32(k+1), W) for the next iteration; None once finished
    iteration: int = 0  # iterations completed
    token_ids: torch.Tensor | None = None  # (32 * iteration,) after the latest iteration

    @property
    def finished(self) -> bool:
        return self.x is None


@dataclass
class StepOutput:
    token_ids: torch.Tensor  # (32(k+1),)
    logits: torch.Tensor | None = None  # (G, V) when the step decoded (halting on)
    pred_gt_prob: torch.Tensor | None = None  # (G,) when decoded
    drop_mask: torch.Tensor | None = None  # (G,) bool, the 2D tokens masked by this step
    trace: dict[str, torch.Tensor] = field(default_factory=dict)  # intermediates when asked


def content_seed(image: torch.Tensor) -> int:
    """A 63-bit seed derived from an image's bytes: same image, same halting draws."""
    data = image.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little") >> 1


def _iteration_seed(seed: int, iteration: int) -> int:
    return (seed + (iteration + 1) * 0x9E3779B97F4A7C15) % (1 << 63)


def halting_uniforms(seeds: list[int], iterations: list[int], cells: int) -> torch.Tensor:
    """(B, cells) uniforms on the CPU, row i from image i's own generator for its iteration: an
    image's halting draws never depend on its batch-mates. Compare with p for Bernoulli(p) draws."""
    out = torch.empty(len(seeds), cells, dtype=torch.float32)
    for i, (seed, it) in enumerate(zip(seeds, iterations)):
        torch.rand(cells, generator=torch.Generator(device="cpu").manual_seed(_iteration_seed(seed, it)), out=out[i])
    return out


def halting_draws(seed: int, iteration: int, probs: torch.Tensor) -> torch.Tensor:
    """Bernoulli(p) draws for one image and one iteration from a generator of its own."""
    return halting_uniforms([seed], [iteration], probs.numel())[0].view(probs.shape).to(probs.device) < probs.float()


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


class ALIT(nn.Module):
    def __init__(self, cfg: ALITConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        w, g2, t = cfg.encoder_width, cfg.num_image_tokens, cfg.tokens_per_iter
        dw = cfg.decoder_width
        scale = w**-0.5
        self.encoder_positional_embedding = nn.Parameter(scale * torch.randn(g2 + 1, w))
        self.encoder_class_embedding = nn.Parameter(scale * torch.randn(1, w))
        self.encoder_mask_token = nn.Parameter(scale * torch.randn(1, 1, w))
        self.decoder_positional_embedding = nn.Parameter(dw**-0.5 * torch.randn(g2 + 1, dw))
        self.decoder_class_embedding = nn.Parameter(dw**-0.5 * torch.randn(1, dw))
        self.decoder_mask_token = nn.Parameter(dw**-0.5 * torch.randn(1, 1, dw))
        self.latent_tokens = nn.Parameter(scale * torch.randn(t, w))
        self.latent_token_positional_embedding = nn.Parameter(scale * torch.randn(t, w))
        self.timestep_embedding = nn.Parameter(scale * torch.randn(cfg.max_iters, t, w))
        self.encoder_ln_pre = nn.LayerNorm(w)
        self.encoder_ln_post = nn.LayerNorm(w)
        self.encoder_ln_recursive = nn.LayerNorm(w)
        self.pre_quantizer_mlp = nn.Linear(w, cfg.vq_token_dim)
        self.encoder = LatentEncoder(w, cfg.encoder_layers, cfg.encoder_heads, cfg.mlp_ratio)
        self.decoder = LatentDecoder(cfg)
        self.patch_embed = nn.Conv2d(3, w - cfg.vqgan.embed_dim, cfg.patch_size, stride=cfg.patch_size)
        self.apply(self._init_weights)
        self.quantize = LatentQuantizer(cfg.vq_codebook_size, cfg.vq_token_dim)
        self.base_tokenizer = nn.Module()
        self.base_tokenizer.vqgan = VQGAN(cfg.vqgan)
        self.batch_mode: BatchMode = "packed"

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @property
    def vqgan(self) -> VQGAN:
        return cast(VQGAN, self.base_tokenizer.vqgan)

    @property
    def device(self) -> torch.device:
        return self.latent_tokens.device

    # ----- building blocks --------------------------------------------------------------------
    def image_tokens(self, img: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """[VQGAN z, patch embedding] per grid cell, L2-normalised: (B, G, W)."""
        tokens = torch.cat([z, self.patch_embed(img)], dim=1).flatten(2).transpose(1, 2)
        return F.normalize(tokens, dim=-1)

    def _fresh_latents(self, iteration: int) -> torch.Tensor:
        return self.latent_tokens + self.latent_token_positional_embedding + self.timestep_embedding[iteration]

    # ----- step API -----------------------------------------------------------------------------
    @torch.no_grad()
    def prepare(self, images: torch.Tensor, seeds: list[int] | None = None) -> list[ImageState]:
        """VQGAN-encode a batch (B, 3, H, W) in [0, 1] and build each image's initial sequence."""
        cfg = self.cfg
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, cfg.img_size, cfg.img_size):
            raise ValueError(f"expected images of shape (B, 3, {cfg.img_size}, {cfg.img_size}), "
                             f"got {tuple(images.shape)}")
        images = images.to(self.device)
        z, gt = self.vqgan.encode(images)
        tokens = self.image_tokens(images, z)
        cls = self.encoder_class_embedding.expand(images.shape[0], 1, -1)
        img_part = torch.cat([cls, tokens.to(cls.dtype)], dim=1) + self.encoder_positional_embedding
        lat = self._fresh_latents(0).expand(images.shape[0], -1, -1)
        x = self.encoder_ln_pre(torch.cat([img_part, lat], dim=1))
        if seeds is None:
            seeds = [content_seed(im) for im in images]
        return [
            ImageState(image=images[i], gt_indices=gt[i], seed=int(seeds[i]), x=x[i])
            for i in range(images.shape[0])
        ]

    @torch.no_grad()
    def advance(
        self,
        states: list[ImageState],
        halting: bool = False,
        threshold: float | None = None,
        draws: list[torch.Tensor] | None = None,
        trace: bool = False,
        stage_timer: Callable[[str], AbstractContextManager] | None = None,
    ) -> list[StepOutput]:
        """Run one iteration for each of `states` (any mix of iterations), updating them in place.

        With `halting`, each image is decoded, and 2D tokens whose own-code probability reaches the
        threshold (`threshold`, default the config's) are masked with probability p, drawn from
        the image's own generator unless `draws` (one (G,) 0/1 tensor per image) injects them.
        `stage_timer(name)`, when given, wraps the "encoder" and "decoder" parts (for metrics).
        """
        if any(s.finished for s in states):
            raise ValueError("advance() got an image that has already run every iteration")
        cfg = self.cfg
        threshold = cfg.halting_threshold if threshold is None else threshold
        g1 = cfg.num_image_tokens + 1
        timer = stage_timer or (lambda name: contextlib.nullcontext())
        with timer("encoder"):
            hs = run_blocks(self.encoder.transformer, [cast(torch.Tensor, s.x) for s in states], self.batch_mode)
            raw = torch.cat([h[g1:] for h in hs])  # every image's latents, back to back
            prequant = self.pre_quantizer_mlp(self.encoder_ln_post(raw))
            counts = [h.shape[0] - g1 for h in hs]
            ids = self.quantize(prequant).split(counts)
            outs = [StepOutput(token_ids=i) for i in ids]
            if trace:
                for o, r, p in zip(outs, raw.split(counts), prequant.split(counts)):
                    o.trace = {"latent_tokens": r, "prequant": p}
        if halting:
            with timer("decoder"):
                logits = self.decode_logits([o.token_ids for o in outs])
            gt = torch.stack([s.gt_indices for s in states])
            probs = logits.softmax(-1).gather(2, gt[:, :, None])[:, :, 0]  # (B, G)
            if draws is not None:
                drawn = torch.stack([d.bool() for d in draws]).to(self.device)
            else:
                u = halting_uniforms([s.seed for s in states], [s.iteration for s in states], probs.shape[1])
                drawn = u.to(self.device, non_blocking=True) < probs
            drop = drawn & (probs >= threshold)
            mask_tok = self.encoder_positional_embedding[1:] + self.encoder_mask_token[0]
            img = torch.stack([h[1:g1] for h in hs])
            img = torch.where(drop[:, :, None], mask_tok.to(img.dtype), img)  # (B, G, W)
            for i, o in enumerate(outs):
                o.logits, o.pred_gt_prob, o.drop_mask = logits[i], probs[i], drop[i]
            parts: list[tuple[torch.Tensor, ...]] = [(h[:1], img[i], h[g1:]) for i, h in enumerate(hs)]
        else:
            parts = [(h,) for h in hs]
        # compute every next sequence before touching any state: a failure leaves all unchanged
        next_x = self._next_inputs(states, parts)
        for s, o, x in zip(states, outs, next_x):
            s.iteration += 1
            s.token_ids = o.token_ids
            s.x = x
        return outs

    def _next_inputs(self, states: list[ImageState],
                     parts: Sequence[tuple[torch.Tensor, ...]]) -> list[torch.Tensor | None]:
        """ln_recursive([h ++ fresh latents]) for every image that has an iteration left: one copy,
        one LayerNorm over all of them (per token, so each image's result is its own)."""
        keep = [i for i, s in enumerate(states) if s.iteration + 1 < self.cfg.max_iters]
        out: list[torch.Tensor | None] = [None] * len(states)
        if not keep:
            return out
        fresh: dict[int, torch.Tensor] = {}
        pieces: list[torch.Tensor] = []
        lengths = []
        for i in keep:
            k = states[i].iteration + 1
            if k not in fresh:
                fresh[k] = self._fresh_latents(k).to(parts[i][0].dtype)
            pieces += [*parts[i], fresh[k]]
            lengths.append(sum(p.shape[0] for p in parts[i]) + fresh[k].shape[0])
        normed = self.encoder_ln_recursive(torch.cat(pieces)).split(lengths)
        for i, x in zip(keep, normed):
            out[i] = x
        return out

    @torch.no_grad()
    def decode_logits(self, token_ids: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """1D token ids (each a multiple of tokens_per_iter long) -> logits (B, G, V), float32."""
        cfg, dec = self.cfg, self.decoder
        code = self.quantize.codes()
        two_d = torch.cat([self.decoder_class_embedding, self.decoder_mask_token[0].expand(cfg.num_image_tokens, -1)])
        two_d = dec.ln_pre(two_d + self.decoder_positional_embedding)  # LayerNorm is per token
        counts = [int(ids.shape[0]) for ids in token_ids]
        for n in counts:
            if n == 0 or n > cfg.decoder_max_latent_tokens:
                raise ValueError(f"token sequences must hold 1..{cfg.decoder_max_latent_tokens} ids, got {n}")
        ids_all = torch.cat([ids.to(self.device) for ids in token_ids])
        pos = torch.cat([dec.latent_token_positional_embedding[:n] for n in counts])
        lat = dec.ln_pre(dec.decoder_embed(code[ids_all].to(two_d.dtype)) + pos)
        seqs: list[Seq] = [(two_d, part) for part in lat.split(counts)]
        ys = run_blocks(dec.transformer, seqs, self.batch_mode)
        grid = torch.stack([y[1 : cfg.num_image_tokens + 1] for y in ys])
        return dec.ffn(dec.ln_post(grid)).float()

    @torch.no_grad()
    def reconstruct(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits (B, G, V) -> pixels (B, 3, H, W): softmax-weighted VQGAN code, VQGAN decoder."""
        g = self.cfg.grid_size
        code = logits.float().softmax(-1) @ self.vqgan.codebook.float()
        code = code.view(code.shape[0], g, g, -1).permute(0, 3, 1, 2)
        return self.vqgan.decode(code.to(self.vqgan.codebook.dtype)).float()

    @torch.no_grad()
    def reconstruct_ids(self, token_ids: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """The /reconstruct path: token ids alone -> pixels."""
        return self.reconstruct(self.decode_logits(token_ids))


def quality(recon: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image L1 (mean |recon - input| over C,H,W, unclamped, as the reference measures it)
    and PSNR in dB of the clamped reconstruction (what a client receives as an image)."""
    recon, images = recon.float(), images.float().to(recon.device)
    l1 = (recon - images).abs().flatten(1).mean(1)
    mse = (recon.clamp(0, 1) - images).pow(2).flatten(1).mean(1)
    psnr = 10 * torch.log10(1.0 / mse.clamp_min(1e-10))
    return l1, psnr


def reference_stop_iteration(l1_per_iter: list[float], threshold: float) -> int:
    """The reference `encode()` rule: the first iteration whose running-minimum L1 is below the
    threshold, else the lowest-L1 iteration (earliest on ties)."""
    best, best_i = math.inf, -1
    for i, v in enumerate(l1_per_iter):
        if v < best:
            best, best_i = v, i
        if best < threshold:
            return best_i
    return best_i
