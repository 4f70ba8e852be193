"""KARL: single-pass adaptive image tokenization (Duggal et al., "Kolmogorov-approximating
representation learning"). One readable file for the network, its configuration and its limits.

Parameter names and shapes match the reference state dicts (`checkpoint['ema']`), so they load with
`strict=True`. Inference is ONE encoder pass per (token budget T, quality bin), nothing recurrent:

    x    = ln_pre([rec_loss_embeddings[bin],                 # 1 quality-conditioning token
                   [patch_embed(img), z] + pos_enc,          # 16x16 image tokens, z = VQGAN encoder
                   latent_tokens[:T]])                       # T latents, no embedding of their own
    h    = transformer(x)                                    # no mask, 257 + T tokens
    halt = sigmoid(halting_mlp(ln_post_halt(h[latents]))) > 0.75     # any position may halt
    ids  = VQ(pre_quantizer_mlp(ln_post(h[latents])))               # all T positions quantised

The image's tokens are the ids of the positions that did not halt, each with its position t in
0..T-1; the token count is T minus the halted ones. The decoder sees only those:

    y      = transformer(ln_pre([mask_token + pos_dec (16x16),
                                 decoder_embed(code[ids]) + decoder_latent_tokens_timestep_embed[t]]))
    logits = ffn(ln_post(y[:256]))  -> softmax-weighted VQGAN code -> VQGAN decoder

Halted latents are dropped instead of masked (equal to float precision, the fixture's README shows),
and every image is decoded on its own: the reference's batched decoder mask is laid out head-major
for a batch-major attention, so only its batch-of-one numbers are right.

The (W, G, G) positional tables are sampled to the 16x16 grid like `F.interpolate(mode="nearest")`:
source index floor(i * G / 16), flattened row-major. The quality target picks a conditioning bin in
float32 (the smallest bin >= q; past the last, the last). A probe key packs both choices into one
int: `budget * 32 + bin` (see `probe_key`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, cast

import numpy as np
import torch
import torch.nn as nn

from .config import ConfigError, PatchGrid, VQGANConfig, known_fields, vqgan_from_dict
from .family import Family, Limits, StepOutput, TargetError
from .presets import PUBLISHED_VQGAN
from .transformer import BatchMode, Block, LatentQuantizer, Seq, run_blocks
from .vqgan import VQGAN

QUALITY_BINS = (0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.09, 0.1, 0.12, 0.14, 0.16, 0.18,
                0.2, 0.24, 0.28, 0.32, 0.38)
GRID = 16  # the reference asserts a 16x16 image-token grid; the weights do not record it
BIN_SLOTS = 32  # probe key = budget * BIN_SLOTS + bin index


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KARLConfig(PatchGrid):
    """KARL hyper-parameters. The defaults are the released `karl_small` with the MaskGIT VQGAN."""

    img_size: int = 256
    patch_size: int = 16
    encoder_width: int = 1024
    encoder_layers: int = 8
    encoder_heads: int = 8
    decoder_width: int = 1024
    decoder_layers: int = 8
    decoder_heads: int = 8
    mlp_ratio: float = 4.0
    vq_codebook_size: int = 4096
    vq_token_dim: int = 12
    latent_rows: int = 512  # rows of latent_tokens / decoder_latent_tokens_timestep_embed: the largest budget
    min_budget: int = 16
    default_budget: int = 256  # the reference demo's
    pos_grid: int = 64  # G of the (W, G, G) positional tables
    halting_hidden: int = 512
    quality_bins: tuple[float, ...] = QUALITY_BINS
    halt_threshold: float = 0.75
    vqgan: VQGANConfig = field(default_factory=VQGANConfig)

    @property
    def max_tokens(self) -> int:
        return self.latent_rows

    def validate(self) -> KARLConfig:
        self.vqgan.validate()
        self.check_grid()
        if (self.vqgan.resolution, self.vqgan.grid_size) != (self.img_size, self.grid_size):
            raise ConfigError(f"VQGAN resolution {self.vqgan.resolution} / grid {self.vqgan.grid_size} differ "
                              f"from img_size {self.img_size} / patch grid {self.grid_size}")
        if self.encoder_width <= self.vqgan.embed_dim:
            raise ConfigError(f"encoder_width ({self.encoder_width}) must exceed the VQGAN embed_dim "
                              f"({self.vqgan.embed_dim}): the patch embedding gets the difference")
        self.check_heads()
        if not 1 <= self.min_budget <= self.default_budget <= self.latent_rows:
            raise ConfigError(f"budgets must satisfy 1 <= min_budget ({self.min_budget}) <= default_budget "
                              f"({self.default_budget}) <= latent_rows ({self.latent_rows})")
        b = self.quality_bins
        if not 1 <= len(b) <= BIN_SLOTS or any(x >= y for x, y in zip(b, b[1:])):
            raise ConfigError(f"quality_bins must be 1..{BIN_SLOTS} strictly increasing values, got {list(b)}")
        if not 0 < self.halt_threshold < 1 or self.pos_grid < 1 or self.halting_hidden < 1:
            raise ConfigError("halt_threshold must lie in (0, 1); pos_grid and halting_hidden must be positive")
        return self

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["quality_bins"] = list(self.quality_bins)
        d["vqgan"]["ch_mult"] = list(self.vqgan.ch_mult)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KARLConfig:
        d = dict(d)
        known_fields(cls, d, "KARL")
        vqgan = vqgan_from_dict(d.pop("vqgan", {}))
        if "quality_bins" in d:
            d["quality_bins"] = tuple(float(x) for x in d["quality_bins"])
        return cls(**d, vqgan=vqgan).validate()

    @classmethod
    def from_reference_json(cls, d: dict[str, Any]) -> KARLConfig:
        """Read the reference fixture's layout (`karl_constructor_kwargs` + a `vqgan` block + the
        top-level facts it records); without that key, our own `to_dict` layout."""
        if "karl_constructor_kwargs" not in d:
            return cls.from_dict(d)
        k = d["karl_constructor_kwargs"]
        if not k.get("quantize_latent", True):
            raise ConfigError("this KARL variant has continuous latents (quantize_latent=False): it produces "
                              "no token ids and cannot be served as a tokenizer")
        if not k.get("vq_use_l2_norm", True):
            raise ConfigError("KARL without L2-normalised codes (vq_use_l2_norm=False) is not supported")
        v, gn = d["vqgan"], d["vqgan"].get("group_norm", {})
        dd = v["ddconfig"]
        vqgan = VQGANConfig(
            ch=dd["ch"], ch_mult=tuple(dd["ch_mult"]), num_res_blocks=dd["num_res_blocks"],
            z_channels=dd["z_channels"], resolution=dd["resolution"], in_channels=dd["in_channels"],
            out_ch=dd["out_ch"], n_embed=v["n_embed"], embed_dim=v["embed_dim"],
            dropout=dd.get("dropout", 0.0), num_groups=gn.get("num_groups", 32), norm_eps=gn.get("eps", 1e-6),
        )
        grid = d.get("positional_embedding_grid", [k.get("max_grid_tokens", 64)] * 2)
        if grid[0] != grid[1]:
            raise ConfigError(f"positional tables must be square, got {grid}")
        # the reference stores float32 bins; keep their shortest decimal spelling (0.005, not 0.00499...)
        bins = tuple(float(str(np.float32(x))) for x in d.get("rec_loss_bins", QUALITY_BINS))
        rows = d.get("latent_token_rows", 512)
        return cls(
            img_size=d.get("img_size", dd["resolution"]), patch_size=k["patch_size"],
            encoder_width=k["encoder_width"], encoder_layers=k["encoder_num_layers"],
            encoder_heads=k["encoder_num_heads"], decoder_width=k["decoder_width"],
            decoder_layers=k["decoder_num_layers"], decoder_heads=k["decoder_num_heads"],
            mlp_ratio=d.get("mlp_ratio", 4.0), vq_codebook_size=k["vq_codebook_size"],
            vq_token_dim=k["vq_token_dim"], latent_rows=rows, min_budget=d.get("min_tokens_attr", 16),
            default_budget=min(256, rows), pos_grid=grid[0], quality_bins=bins,
            halt_threshold=d.get("halt_prob_threshold", 0.75), vqgan=vqgan,
        ).validate()


PRESETS: dict[str, KARLConfig] = {
    "karl_small": KARLConfig(vqgan=PUBLISHED_VQGAN),  # the released configuration
    # The shape of the reference fixture: 64 px, 16x16 grid, 64 wide, (64, 32, 32) positional tables.
    "karl_test_tiny": KARLConfig(
        img_size=64, patch_size=4, encoder_width=64, encoder_layers=2, encoder_heads=2,
        decoder_width=64, decoder_layers=2, decoder_heads=2, vq_codebook_size=256, pos_grid=32,
        vqgan=VQGANConfig(ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, z_channels=32, resolution=64,
                          n_embed=128, embed_dim=32),
    ),
}


def check_weights(sd: dict[str, torch.Tensor]) -> None:
    """Refuse the continuous-latent variant: without the 1D codebook there are no token ids."""
    if "quantize.embedding.weight" not in sd:
        raise ConfigError("this KARL checkpoint has continuous latents (no quantize.embedding.weight): "
                          "it produces no token ids and cannot be served as a tokenizer")


def infer_config(sd: dict[str, torch.Tensor], heads: int | None = None) -> KARLConfig:
    """Rebuild the configuration from tensor shapes. Heads leave no trace in the weights: `heads`, or
    the preset with the same width and depth. Quality bin values are not in the weights either: the
    reference's 19 are assumed when there are 19 conditioning rows."""
    check_weights(sd)

    def shape(key: str) -> tuple[int, ...]:
        if key not in sd:
            raise ConfigError(f"cannot infer the KARL configuration: key {key!r} is missing")
        return tuple(sd[key].shape)

    def count(prefix: str) -> int:
        return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})

    v = "base_tokenizer.vqgan."
    ch = shape(v + "encoder.conv_in.weight")[0]
    levels = count(v + "encoder.down.")
    width, grid, _ = shape("encoder_positional_embedding")
    dec_width = shape("decoder_positional_embedding")[0]
    layers, dec_layers = count("encoder.transformer."), count("decoder.transformer.")
    table = {(p.encoder_width, p.encoder_layers): p.encoder_heads for p in PRESETS.values()}
    enc_heads = heads or table.get((width, layers))
    dec_heads = heads or table.get((dec_width, dec_layers))
    if enc_heads is None or dec_heads is None:
        raise ConfigError(f"cannot infer attention heads for a KARL of width {width} x {layers} layers "
                          "(no preset matches): pass heads explicitly, or put a config.json beside the weights")
    if shape("rec_loss_embeddings")[0] != len(QUALITY_BINS):
        raise ConfigError(f"{shape('rec_loss_embeddings')[0]} quality rows, but the bin values are not "
                          "stored in the weights: put a config.json beside the weights")
    patch = shape("patch_embed.weight")[-1]
    rows = shape("latent_tokens")[0]
    vqgan = VQGANConfig(
        ch=ch, ch_mult=tuple(shape(f"{v}encoder.down.{i}.block.0.conv1.weight")[0] // ch for i in range(levels)),
        num_res_blocks=count(v + "encoder.down.0.block."), z_channels=shape(v + "encoder.conv_out.weight")[0],
        resolution=GRID * patch, in_channels=shape(v + "encoder.conv_in.weight")[1],
        out_ch=shape(v + "decoder.conv_out.weight")[0], n_embed=shape(v + "quantize.embedding.weight")[0],
        embed_dim=shape(v + "quantize.embedding.weight")[1],
    )
    try:
        return KARLConfig(
            img_size=GRID * patch, patch_size=patch, encoder_width=width, encoder_layers=layers,
            encoder_heads=enc_heads, decoder_width=dec_width, decoder_layers=dec_layers, decoder_heads=dec_heads,
            mlp_ratio=shape("encoder.transformer.0.mlp.c_fc.weight")[0] / width,
            vq_codebook_size=shape("quantize.embedding.weight")[0], vq_token_dim=shape("quantize.embedding.weight")[1],
            latent_rows=rows, default_budget=min(256, rows), pos_grid=grid,
            halting_hidden=shape("halting_mlp.0.weight")[0], vqgan=vqgan,
        ).validate()
    except ConfigError as e:
        raise ConfigError(f"inferred KARL configuration is inconsistent: {e}") from e


# ----------------------------------------------------------------------------------------------
# Probes and limits: what a target becomes
# ----------------------------------------------------------------------------------------------


def quality_bin(q: float | None, bins: tuple[float, ...] = QUALITY_BINS) -> int:
    """The conditioning bin for a desired L1 `q`, as the reference picks it: q is added to a float32
    zero, then the smallest bin >= it (compared in float32), else the last. No target: bin 0."""
    if q is None:
        return 0
    q32 = torch.zeros((), dtype=torch.float32) + float(q)
    hits = (torch.tensor(bins, dtype=torch.float32) >= q32).nonzero()
    return int(hits[0, 0]) if len(hits) else len(bins) - 1


def probe_key(budget: int, bin_index: int) -> int:
    """One int naming a single pass: `budget * 32 + bin_index` (bin_index < 32)."""
    return budget * BIN_SLOTS + bin_index


def split_probe(key: int) -> tuple[int, int]:
    """(budget, bin index) of a probe key."""
    return divmod(int(key), BIN_SLOTS)


@dataclass(frozen=True)
class KARLLimits(Limits):
    """A target's `max_tokens` is the budget T of the pass (default: the config's), its `max_l1` picks
    the quality bin (none: bin 0, the strictest). One probe per target; with `retry_stricter`, the
    next stricter bin each time the measured L1 misses the target, down to bin 0."""

    family: ClassVar[str] = "karl"
    accepts: ClassVar[tuple[str, ...]] = ("max_l1", "max_tokens")
    positional: ClassVar[bool] = True
    probe_name: ClassVar[tuple[str, str]] = ("pass", "passes")

    latent_rows: int = 512
    min_budget: int = 16
    default_budget: int = 256
    quality_bins: tuple[float, ...] = QUALITY_BINS
    retry_stricter: bool = False

    @classmethod
    def of(cls, cfg: KARLConfig, retry_stricter: bool = False) -> KARLLimits:
        return cls(cfg.latent_rows, cfg.min_budget, cfg.default_budget, cfg.quality_bins, retry_stricter,
                   image_size=cfg.img_size, codebook=cfg.vq_codebook_size)

    @property
    def max_tokens(self) -> int:
        return self.latent_rows

    @property
    def max_probes(self) -> int:
        return len(self.quality_bins) if self.retry_stricter else 1

    def quality_bin(self, max_l1: float | None) -> int:
        return quality_bin(max_l1, self.quality_bins)

    def ladder(self, max_l1: float | None, min_psnr: float | None, tokens: int | None,
               max_tokens: int | None) -> list[int]:
        budget = next((t for t in (max_tokens, tokens) if t is not None), self.default_budget)
        b = self.quality_bin(max_l1)
        return [probe_key(budget, i) for i in (range(b, -1, -1) if self.retry_stricter else [b])]

    def check_budget(self, field: str, value: int) -> int:
        lo, hi = self.min_budget, self.latent_rows
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
            raise TargetError(field, f"must be an integer token budget; this model takes budgets from {lo} "
                                     f"to {hi}, got {value!r}")
        return int(value)

    def check_sequence(self, n: int, positions: np.ndarray | None) -> None:
        rows = self.latent_rows
        if not 0 <= n <= rows:  # 0: every latent of a pass halted, which KARL still decodes
            raise TargetError("token_ids", f"a KARL token sequence holds 0 to {rows} ids, got {n}")
        if positions is None:
            return
        p = np.asarray(positions)
        if p.shape != (n,) or not np.issubdtype(p.dtype, np.integer):
            raise TargetError("positions", f"must be {n} integers, one per token id, got shape {p.shape} "
                                           f"of {p.dtype}")
        if n and (p[0] < 0 or p[-1] >= rows or (np.diff(p) <= 0).any()):
            raise TargetError("positions", f"must be strictly increasing integers in [0, {rows})")

    def describe(self, probe: int) -> dict[str, Any]:
        budget, b = split_probe(probe)
        return {"budget": budget, "quality_bin": round(float(self.quality_bins[b]), 6)}

    def variant(self, halting: bool) -> str:
        return "karl"  # the 2D-token halting setting does not apply to KARL

    def info(self) -> dict[str, Any]:
        return {"quality_bins": list(self.quality_bins), "default_budget": self.default_budget,
                "min_budget": self.min_budget, "retry_stricter": self.retry_stricter}


# ----------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------


def sample_grid(table: torch.Tensor, g: int) -> torch.Tensor:
    """A (W, G, G) positional table at g x g cells, as `F.interpolate(mode="nearest")` samples it
    (source index floor(i * G / g)), flattened row-major: (g*g, W)."""
    idx = torch.tensor([i * table.shape[-1] // g for i in range(g)], device=table.device)
    return table[:, idx][:, :, idx].flatten(1).t()


class Transformer(nn.Module):
    """A stack of pre-LN blocks (the reference `Encoder`/`Decoder` keep them under `transformer`)."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.transformer = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(layers))


class LatentDecoder(Transformer):
    def __init__(self, cfg: KARLConfig):
        w = cfg.decoder_width
        super().__init__(w, cfg.decoder_layers, cfg.decoder_heads, cfg.mlp_ratio)
        self.ln_pre = nn.LayerNorm(w)
        self.ln_post = nn.LayerNorm(w)
        self.ffn = nn.Sequential(nn.Linear(w, 2 * w), nn.Tanh(), nn.Linear(2 * w, cfg.vqgan.n_embed))


@dataclass
class KARLState:
    image: torch.Tensor  # (3, H, W) preprocessed pixels in [0, 1]
    tokens: torch.Tensor  # (G, W) image tokens + sampled encoder positions, computed once
    iteration: int = 0  # probes run


class KARL(nn.Module):
    def __init__(self, cfg: KARLConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        w, dw, g = cfg.encoder_width, cfg.decoder_width, cfg.pos_grid
        self.encoder_positional_embedding = nn.Parameter(w**-0.5 * torch.randn(w, g, g))
        self.decoder_positional_embedding = nn.Parameter(dw**-0.5 * torch.randn(dw, g, g))
        self.decoder_mask_token = nn.Parameter(dw**-0.5 * torch.randn(1, 1, dw))
        self.decoder_latent_tokens_timestep_embed = nn.Parameter(dw**-0.5 * torch.randn(cfg.latent_rows, dw))
        self.latent_tokens = nn.Parameter(w**-0.5 * torch.randn(cfg.latent_rows, w))
        # one constant row per bin at initialisation, as the reference
        self.rec_loss_embeddings = nn.Parameter(torch.tensor(cfg.quality_bins)[:, None].repeat(1, w))
        self.encoder = Transformer(w, cfg.encoder_layers, cfg.encoder_heads, cfg.mlp_ratio)
        self.encoder_ln_pre = nn.LayerNorm(w)
        self.encoder_ln_post_halt = nn.LayerNorm(w)
        self.encoder_ln_post = nn.LayerNorm(w)
        self.pre_quantizer_mlp = nn.Linear(w, cfg.vq_token_dim)
        self.halting_mlp = nn.Sequential(nn.Linear(w, cfg.halting_hidden), nn.Tanh(), nn.Linear(cfg.halting_hidden, 1))
        self.decoder = LatentDecoder(cfg)
        self.decoder_embed = nn.Linear(cfg.vq_token_dim, dw)
        self.patch_embed = nn.Conv2d(3, w - cfg.vqgan.embed_dim, cfg.patch_size, stride=cfg.patch_size)
        self.apply(self._init_weights)
        self.quantize = LatentQuantizer(cfg.vq_codebook_size, cfg.vq_token_dim)
        self.base_tokenizer = nn.Module()
        self.base_tokenizer.vqgan = VQGAN(cfg.vqgan)
        self.batch_mode: BatchMode = "packed"
        self.retry_stricter = False

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @property
    def limits(self) -> KARLLimits:
        return KARLLimits.of(self.cfg, self.retry_stricter)

    @property
    def vqgan(self) -> VQGAN:
        return cast(VQGAN, self.base_tokenizer.vqgan)

    @property
    def device(self) -> torch.device:
        return self.latent_tokens.device

    # ----- building blocks --------------------------------------------------------------------
    def image_tokens(self, img: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """[patch embedding, VQGAN z] per grid cell (patch embedding first), not normalised: (B, G, W)."""
        return torch.cat([self.patch_embed(img), z.to(img.dtype)], dim=1).flatten(2).transpose(1, 2)

    def encoder_positions(self) -> torch.Tensor:
        return sample_grid(self.encoder_positional_embedding, self.cfg.grid_size)

    def decoder_queries(self) -> torch.Tensor:
        """The 2D half of every decoder input: mask token + sampled decoder positions, (G, Wd)."""
        return self.decoder_mask_token[0] + sample_grid(self.decoder_positional_embedding, self.cfg.grid_size)

    def _probe(self, key: int) -> tuple[int, int]:
        budget, b = split_probe(key)
        if not 1 <= budget <= self.cfg.latent_rows or b >= len(self.cfg.quality_bins):
            raise ValueError(f"probe {key} names budget {budget} and quality bin {b}: budgets run from 1 to "
                             f"{self.cfg.latent_rows}, bins from 0 to {len(self.cfg.quality_bins) - 1}")
        return budget, b

    # ----- step API -----------------------------------------------------------------------------
    @torch.no_grad()
    def prepare(self, images: torch.Tensor, seeds: list[int] | None = None) -> list[KARLState]:
        """VQGAN-encode a batch (B, 3, H, W) in [0, 1] into per-image tokens. `seeds` is ignored:
        KARL draws nothing at inference."""
        s = self.cfg.img_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, s, s):
            raise ValueError(f"expected images of shape (B, 3, {s}, {s}), got {tuple(images.shape)}")
        images = images.to(self.device)
        z, _ = self.vqgan.encode(images)
        tokens = self.image_tokens(images, z) + self.encoder_positions()
        return [KARLState(image=images[i], tokens=tokens[i]) for i in range(images.shape[0])]

    @torch.no_grad()
    def advance(self, states: list[KARLState], probes: list[int] | None = None, halting: bool = False,
                stage_timer: Callable[[str], AbstractContextManager] | None = None,
                trace: bool = False) -> list[StepOutput]:
        """One single pass per state at its probe's (budget, quality bin), all in one transformer call
        whatever their budgets. `halting` (ALIT's 2D-token halting) does not apply. No probes: the
        default budget at bin 0."""
        keys = list(probes) if probes is not None else [probe_key(self.cfg.default_budget, 0)] * len(states)
        if len(keys) != len(states):
            raise ValueError(f"{len(states)} states but {len(keys)} probes")
        passes = [self._probe(k) for k in keys]
        if not states:
            return []
        g1, rows = self.cfg.num_image_tokens + 1, self.cfg.latent_rows
        nb = len(self.cfg.quality_bins)
        timer = stage_timer or (lambda name: contextlib.nullcontext())
        with timer("encoder"):
            # LayerNorm works per token: normalise every piece once; `pack` concatenates them
            parts = [self.rec_loss_embeddings, self.latent_tokens, *(s.tokens for s in states)]
            normed = self.encoder_ln_pre(torch.cat([p.to(states[0].tokens.dtype) for p in parts]))
            cond, lat, imgs = normed[:nb], normed[nb:nb + rows], normed[nb + rows:].split(g1 - 1)
            seqs: list[Seq] = [(cond[b : b + 1], img, lat[:t]) for (t, b), img in zip(passes, imgs)]
            hs = run_blocks(self.encoder.transformer, seqs, self.batch_mode)
            budgets = [t for t, _ in passes]
            latents = torch.cat([h[g1:] for h in hs])
            halt_logit = self.halting_mlp(self.encoder_ln_post_halt(latents))[:, 0].float()
            halted = torch.sigmoid(halt_logit) > self.cfg.halt_threshold
            prequant = self.pre_quantizer_mlp(self.encoder_ln_post(latents))
            ids = self.quantize(prequant)
            outs = []
            per_pass = zip(keys, budgets, halt_logit.split(budgets), halted.split(budgets), ids.split(budgets),
                           prequant.split(budgets), hs, seqs)
            for key, t, hl, hd, idx, pq, h, seq in per_pass:
                kept = ~hd
                out = StepOutput(token_ids=idx[kept], probe=int(key),
                                 positions=torch.arange(t, device=idx.device)[kept])
                if trace:
                    out.trace = {"halt_logit": hl, "halted": hd, "latent_ids": idx, "prequant": pq,
                                 "latent_out": h[g1:], "encoder_in": torch.cat(seq), "encoder_out": h}
                outs.append(out)
        for s in states:  # only now that everything succeeded
            s.iteration += 1
        return outs

    def step_weight(self, state: KARLState, probe: int) -> int:
        return self.cfg.num_image_tokens + 1 + split_probe(probe)[0]

    @torch.no_grad()
    def decode_logits(self, token_ids: list[torch.Tensor],
                      positions: list[torch.Tensor | None] | None = None) -> torch.Tensor:
        """Token ids, each with its position in 0..latent_rows-1 (None: 0..n-1) -> logits (B, G, V),
        float32. Each sequence is decoded on its own (one packed call for all). An empty sequence is
        valid: every latent of a pass may halt, and the 2D queries still decode (to the model's prior)."""
        rows, dec = self.cfg.latent_rows, self.decoder
        pos = list(positions) if positions is not None else [None] * len(token_ids)
        if len(pos) != len(token_ids):
            raise ValueError(f"{len(token_ids)} token sequences but {len(pos)} position lists")
        counts = [int(ids.shape[0]) for ids in token_ids]
        for n, p in zip(counts, pos):
            if n > rows:
                raise ValueError(f"token sequences must hold at most {rows} ids, got {n}")
            if p is not None and tuple(p.shape) != (n,):
                raise ValueError(f"{n} token ids but positions of shape {tuple(p.shape)}")
        ids_all = torch.cat([ids.to(self.device, torch.long) for ids in token_ids])
        pos_all = torch.cat([torch.arange(n, device=self.device) if p is None else p.to(self.device)
                             for n, p in zip(counts, pos)])
        two_d = dec.ln_pre(self.decoder_queries())  # LayerNorm is per token: once for every sequence
        code = self.quantize.codes()[ids_all].to(self.decoder_embed.weight.dtype)
        lat = dec.ln_pre(self.decoder_embed(code) + self.decoder_latent_tokens_timestep_embed[pos_all])
        seqs: list[Seq] = [(two_d, part.to(two_d.dtype)) for part in lat.split(counts)]
        ys = run_blocks(dec.transformer, seqs, self.batch_mode)
        grid = torch.stack([y[: self.cfg.num_image_tokens] for y in ys])
        return dec.ffn(dec.ln_post(grid)).float()

    @torch.no_grad()
    def reconstruct(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits (B, G, V) -> pixels (B, 3, H, W): softmax-weighted VQGAN code, VQGAN decoder."""
        return self.vqgan.decode_soft(logits)


def card(cfg: KARLConfig) -> list[tuple[str, str]]:
    """Model-card rows for a KARL configuration."""
    c = cfg
    return [
        ("image size / patch / grid", f"{c.img_size} / {c.patch_size} / {c.grid_size}x{c.grid_size}"),
        ("encoder / decoder", f"{c.encoder_width}w x {c.encoder_layers}L x {c.encoder_heads}h / "
                              f"{c.decoder_width}w x {c.decoder_layers}L x {c.decoder_heads}h"),
        ("token budgets", f"{c.min_budget} to {c.latent_rows} (default {c.default_budget}); halted tokens dropped"),
        ("quality bins (max L1)", ", ".join(f"{b:g}" for b in c.quality_bins)),
        ("1D codebook", f"{c.vq_codebook_size} x {c.vq_token_dim} (L2-normalised)"),
        ("VQGAN codebook", f"{c.vqgan.n_embed} x {c.vqgan.embed_dim}"),
    ]


FAMILY = Family(
    name="karl", model=KARL, config=KARLConfig, presets=PRESETS,
    marker="rec_loss_embeddings", reference_key="karl_constructor_kwargs", infer_config=infer_config,
    card=card, verifier="service.verify_karl:verify_karl", check_weights=check_weights,
)
