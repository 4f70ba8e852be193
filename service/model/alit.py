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
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ALITConfig
from .family import Family, Limits, StepOutput, TargetError, content_seed, quality  # noqa: F401  (re-exported)
from .presets import PRESETS, infer_config
from .transformer import BatchMode, Block, LatentQuantizer, Seq, run_blocks
from .vqgan import VQGAN

# ----------------------------------------------------------------------------------------------
# The latent encoder and decoder (blocks from transformer.py)
# ----------------------------------------------------------------------------------------------


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
# What ALIT accepts: probes are iterations
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ALITLimits(Limits):
    """ALIT's targets: a probe is an iteration (key = its 1-based number, 32 more tokens each); a
    quality target walks iterations 1.. up to its cap, an exact budget runs to its iteration."""

    tokens_per_iter: int = 32
    max_iters: int = 8
    halting_threshold: float = 0.55
    family = "alit"

    @property
    def max_tokens(self) -> int:
        return self.tokens_per_iter * self.max_iters

    @property
    def max_probes(self) -> int:
        return self.max_iters

    def ladder(self, max_l1: float | None, min_psnr: float | None, tokens: int | None,
               max_tokens: int | None) -> list[int]:
        budget = tokens if tokens is not None else max_tokens  # an exact budget answers with its last probe
        cap = self.max_iters if budget is None else budget // self.tokens_per_iter
        return list(range(1, cap + 1))

    def check_budget(self, field: str, value: int) -> int:
        t = self.tokens_per_iter
        if value < t or value > self.max_tokens or value % t:
            raise TargetError(field, f"must be a multiple of {t} between {t} and {self.max_tokens}, got {value}")
        return value

    def check_sequence(self, n: int, positions) -> None:
        t = self.tokens_per_iter
        if n == 0 or n % t or n > self.max_tokens:
            raise TargetError("token_ids", f"length must be a multiple of {t} between {t} and {self.max_tokens}, "
                                           f"got {n}")
        if positions is not None:
            raise TargetError("positions", "an ALIT model's tokens carry no positions (every prefix of 32k ids is "
                                           "one iteration's sequence)")

    def variant(self, halting: bool) -> str:
        return f"halting=on:thr={self.halting_threshold}" if halting else "halting=off"

    def token_buckets(self) -> tuple[int, ...]:
        return tuple(range(self.tokens_per_iter, self.max_tokens + 1, self.tokens_per_iter))

    def info(self) -> dict:
        return {"tokens_per_iteration": self.tokens_per_iter, "max_iterations": self.max_iters}


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
        self.retry_stricter = False  # family.Tokenizer's option for conditioned families; ALIT has none

    @property
    def limits(self) -> ALITLimits:
        c = self.cfg
        return ALITLimits(c.tokens_per_iter, c.max_iters, c.halting_threshold, image_size=c.img_size,
                          codebook=c.vq_codebook_size)

    def step_weight(self, state: ImageState, probe: int) -> int:
        """The sequence an iteration runs: class token, grid, and 32 latents per iteration so far."""
        return self.cfg.num_image_tokens + 1 + self.cfg.tokens_per_iter * probe

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
        probes: list[int] | None = None,
        halting: bool = False,
        threshold: float | None = None,
        draws: list[torch.Tensor] | None = None,
        trace: bool = False,
        stage_timer: Callable[[str], AbstractContextManager] | None = None,
    ) -> list[StepOutput]:
        """Run one iteration for each of `states` (any mix of iterations), updating them in place.

        `probes`, when given, must be each image's next iteration (ALIT cannot run another).
        With `halting`, each image is decoded, and 2D tokens whose own-code probability reaches the
        threshold (`threshold`, default the config's) are masked with probability p, drawn from
        the image's own generator unless `draws` (one (G,) 0/1 tensor per image) injects them.
        `stage_timer(name)`, when given, wraps the "encoder" and "decoder" parts (for metrics).
        """
        if any(s.finished for s in states):
            raise ValueError("advance() got an image that has already run every iteration")
        if probes is not None and any(p != s.iteration + 1 for s, p in zip(states, probes)):
            raise ValueError("an ALIT image can only run its next iteration")
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
            outs = [StepOutput(token_ids=i, probe=s.iteration + 1) for i, s in zip(ids, states)]
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
    def decode_logits(self, token_ids: list[torch.Tensor] | torch.Tensor,
                      positions: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
        """1D token ids (each a multiple of tokens_per_iter long) -> logits (B, G, V), float32.
        ALIT's tokens carry no positions: `positions` must be absent (or all None)."""
        if positions is not None and any(p is not None for p in positions):
            raise ValueError("ALIT token sequences carry no positions")
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
        return self.vqgan.decode_soft(logits)

    @torch.no_grad()
    def reconstruct_ids(self, token_ids: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """The /reconstruct path: token ids alone -> pixels."""
        return self.reconstruct(self.decode_logits(token_ids))


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


def card(c: ALITConfig) -> list[tuple[str, str]]:
    """Model-card rows for a configuration."""
    return [
        ("image size / patch / grid", f"{c.img_size} / {c.patch_size} / {c.grid_size}x{c.grid_size}"),
        ("encoder / decoder", f"{c.encoder_width}w x {c.encoder_layers}L x {c.encoder_heads}h / "
                              f"{c.decoder_width}w x {c.decoder_layers}L x {c.decoder_heads}h"),
        ("1D tokens", f"{c.tokens_per_iter} per iteration, up to {c.max_tokens}, codebook "
                      f"{c.vq_codebook_size} x {c.vq_token_dim}"),
        ("VQGAN codebook", f"{c.vqgan.n_embed} x {c.vqgan.embed_dim}"),
    ]


FAMILY = Family(name="alit", model=ALIT, config=ALITConfig, presets=PRESETS, marker="timestep_embedding",
                reference_key="alit_constructor_kwargs", infer_config=infer_config, card=card,
                verifier="service.verify:verify_alit")
