"""TiTok and One-D-Piece: 1D image tokenizers whose token prefixes decode on their own.

TiTok ("An Image is Worth 32 Tokens", Yu et al. 2024) encodes an image into N 1D tokens;
One-D-Piece (Turing Motors, 2025) is the same network trained with Tail Token Drop, so that any
prefix of the N ids decodes to a picture of the whole image. One file serves both: the state dicts
are identical (`modeling/titok.py:TiTok` / `modeling/one_d_piece.py:OneDPiece` of the reference,
commit 473665d), and at inference they differ only in configuration: One-D-Piece relaxes the
decoder's length assertion (`strict_length=False`), TiTok keeps it (only all N ids decode).

    x    = ln_pre([class, patch_embed(img)] + pos_enc  ++  latent_tokens + latent_pos_enc)
    h    = ln_post(transformer(x)[latents])                    # (N, W), once per image
    z    = conv_out(h.reshape(W, N))                           # the LEGACY reshape, not a transpose
    ids  = VQ(z)                                               # N ids, L2-normalised codes
    ---- a prefix of k ids (1 <= k <= N) ----
    y      = transformer(ln_pre([class, mask x g*g] + pos_dec  ++  decoder_embed(code[ids[:k]]) + latent_pos_dec[:k]))
    logits = ffn(ln_post(y[1 : 1 + g*g]))                      # g*g + 1 + k tokens, no mask, nothing padded
    pixels = pixel_decoder(softmax(logits) @ pixel_codebook)   # soft code, raw rows; never clamped

The encoder runs once per image (`prepare`); a probe is a prefix length k, and its cost is one
decode (`advance` only slices the ids). The legacy reshape views each image's contiguous (N, W)
block as (W, N): conv channel c at position n is flat element c*N + n, i.e. latent token
(c*N + n) // W, channel (c*N + n) % W (for W = N it looks like a transpose; it is not one).

A target's ladder walks prefix lengths `ladder_step`, 2*`ladder_step`, ... up to its cap (N, or the
target's `max_tokens`, which ends the ladder when it is not a multiple of the step); an exact
`tokens` is one probe. Strict-length (TiTok) models have one probe, N.

Not in this file: the reference's training-mode `OneDPiece.decode` draws a random prefix length per
call (Tail Token Drop); nothing here draws anything, in either mode. Preprocessing (the reference
inference script resizes with PIL *bilinear*, not bicubic) is the service's, see `service/imaging.py`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ConfigError, PatchGrid, VQGANConfig, known_fields, vqgan_from_dict
from .family import Family, Limits, StepOutput, TargetError
from .presets import PUBLISHED_VQGAN
from .transformer import BatchMode, Block, LatentQuantizer, Seq, run_blocks
from .vqgan import ResnetBlock, VectorQuantizer2D

# The reference's ViT sizes by name (width, layers, heads): `vit_{enc,dec}_model_size`.
VIT_SIZES: dict[str, tuple[int, int, int]] = {
    "small": (512, 8, 8),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}
LADDER_STEP = 32


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TiTokConfig(PatchGrid):
    """TiTok / One-D-Piece hyper-parameters. Defaults: One-D-Piece-S-256 (`one_d_piece_s256`).

    `pixel_vqgan` describes the MaskGIT-VQGAN pixel stage (its codebook and decoder; there is no
    pixel encoder): `ch` is the decoder's hidden channels, `out_ch` its output channels, `n_embed`
    x `embed_dim` the pixel codebook (= the logits' vocabulary). `strict_length`: only all
    `num_latent_tokens` ids decode (TiTok). `ladder_step`: the spacing of the prefix lengths a
    quality target walks (step, 2*step, ..., N)."""

    img_size: int = 256
    patch_size: int = 16
    encoder_width: int = 512
    encoder_layers: int = 8
    encoder_heads: int = 8
    decoder_width: int = 512
    decoder_layers: int = 8
    decoder_heads: int = 8
    mlp_ratio: float = 4.0
    num_latent_tokens: int = 256
    vq_codebook_size: int = 4096
    vq_token_dim: int = 12
    use_l2_norm: bool = True
    strict_length: bool = False
    ladder_step: int = LADDER_STEP
    pixel_vqgan: VQGANConfig = field(default_factory=lambda: PUBLISHED_VQGAN)

    @property
    def max_tokens(self) -> int:
        return self.num_latent_tokens

    def validate(self) -> TiTokConfig:
        px = self.pixel_vqgan
        px.validate()
        self.check_grid()
        if (px.resolution, px.grid_size) != (self.img_size, self.grid_size):
            raise ConfigError(f"pixel decoder resolution {px.resolution} / grid {px.grid_size} differ from "
                              f"img_size {self.img_size} / patch grid {self.grid_size}")
        self.check_heads()
        if self.num_latent_tokens < 1 or self.vq_codebook_size < 1 or self.vq_token_dim < 1:
            raise ConfigError("num_latent_tokens, vq_codebook_size and vq_token_dim must be positive")
        if not self.use_l2_norm:
            raise ConfigError("TiTok without L2-normalised codes (use_l2_norm=False) is not supported: every "
                              "released TiTok / One-D-Piece tokenizer uses them")
        if self.ladder_step < 1:
            raise ConfigError(f"ladder_step must be a positive number of tokens, got {self.ladder_step}")
        return self

    # ----- serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["pixel_vqgan"]["ch_mult"] = list(self.pixel_vqgan.ch_mult)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TiTokConfig:
        d = dict(d)
        known_fields(cls, d, "TiTok")
        pixel_vqgan = vqgan_from_dict(d.pop("pixel_vqgan", asdict(PUBLISHED_VQGAN)), "pixel_vqgan")
        return cls(**d, pixel_vqgan=pixel_vqgan).validate()

    @classmethod
    def from_reference_json(cls, d: dict[str, Any]) -> TiTokConfig:
        """Read the reference's nested config (its yaml, or the `config.json` its `save_pretrained`
        writes: `model.vq_model` + `dataset.preprocessing.crop_size`, plus a golden fixture's
        `model.fixture_overrides` for the sizes the reference hard-codes); without a `model` key,
        our own `to_dict` layout."""
        if "model" not in d:
            return cls.from_dict(d)
        m = d["model"]
        vq = m["vq_model"]
        if not vq.get("finetune_decoder", True):
            raise ConfigError("a stage-1 TiTok (finetune_decoder=False) holds no pixel decoder: it predicts codes of "
                              "a separate MaskGIT-VQGAN and cannot be served on its own")
        if not vq.get("is_legacy", True):
            raise ConfigError("non-legacy TiTok (is_legacy=False: a permute instead of the legacy reshape) is not "
                              "supported; only the legacy form, which One-D-Piece uses, is")
        if vq.get("quantize_mode", "vq") != "vq":
            raise ConfigError(f"TiTok with quantize_mode={vq['quantize_mode']!r} produces no token ids; only 'vq' "
                              "is supported")
        if vq["vit_enc_patch_size"] != vq["vit_dec_patch_size"]:
            raise ConfigError(f"encoder patch size {vq['vit_enc_patch_size']} differs from the decoder's "
                              f"{vq['vit_dec_patch_size']}: not supported")
        over = m.get("fixture_overrides", {})
        sizes = dict(VIT_SIZES)
        for name, s in over.get("model_sizes", {}).items():
            sizes[name] = (s["width"], s["num_layers"], s["num_heads"])

        def size(key: str) -> tuple[int, int, int]:
            if vq[key] not in sizes:
                raise ConfigError(f"unknown {key} {vq[key]!r} (known: {', '.join(sizes)})")
            return sizes[vq[key]]

        (ew, el, eh), (dw, dl, dh) = size("vit_enc_model_size"), size("vit_dec_model_size")
        pixel = PUBLISHED_VQGAN  # the reference hard-codes MaskGIT's VQGAN
        if "pixel_vqgan" in over:
            p, pd = over["pixel_vqgan"], over["pixel_vqgan"]["decoder"]
            if pd.get("num_resolutions", len(pd["channel_mult"])) != len(pd["channel_mult"]):
                raise ConfigError(f"pixel decoder num_resolutions {pd['num_resolutions']} differs from its "
                                  f"{len(pd['channel_mult'])} channel multipliers")
            pixel = VQGANConfig(
                ch=pd["hidden_channels"], ch_mult=tuple(pd["channel_mult"]), num_res_blocks=pd["num_res_blocks"],
                z_channels=pd["z_channels"], resolution=pd["resolution"], out_ch=pd.get("num_channels", 3),
                n_embed=p["num_embeddings"], embed_dim=p["embedding_dim"], dropout=pd.get("dropout", 0.0),
            )
        return cls(
            img_size=d["dataset"]["preprocessing"]["crop_size"], patch_size=vq["vit_enc_patch_size"],
            encoder_width=ew, encoder_layers=el, encoder_heads=eh,
            decoder_width=dw, decoder_layers=dl, decoder_heads=dh,
            num_latent_tokens=vq["num_latent_tokens"], vq_codebook_size=vq["codebook_size"],
            vq_token_dim=vq["token_size"], use_l2_norm=bool(vq["use_l2_norm"]),
            strict_length=bool(vq.get("strict_length_assertion", True)), pixel_vqgan=pixel,
        ).validate()


def _released(size: str, tokens: int, strict: bool) -> TiTokConfig:
    w, layers, heads = VIT_SIZES[size]
    return TiTokConfig(img_size=256, patch_size=16, encoder_width=w, encoder_layers=layers, encoder_heads=heads,
                       decoder_width=w, decoder_layers=layers, decoder_heads=heads, num_latent_tokens=tokens,
                       vq_codebook_size=4096, vq_token_dim=12, strict_length=strict, pixel_vqgan=PUBLISHED_VQGAN)


PRESETS: dict[str, TiTokConfig] = {
    # the reference's configs/one-d-piece_{s,b,l}256.yaml and configs/titok_{s128,b64,l32}.yaml
    "one_d_piece_s256": _released("small", 256, strict=False),
    "one_d_piece_b256": _released("base", 256, strict=False),
    "one_d_piece_l256": _released("large", 256, strict=False),
    "titok_s128": _released("small", 128, strict=True),
    "titok_b64": _released("base", 64, strict=True),
    "titok_l32": _released("large", 32, strict=True),
    # The shape of the golden fixture (fixtures/one-d-piece-reference): 64 px, 16x16 grid, 64 wide, 64 tokens.
    "titok_test_tiny": TiTokConfig(
        img_size=64, patch_size=4, encoder_width=64, encoder_layers=2, encoder_heads=2,
        decoder_width=64, decoder_layers=2, decoder_heads=2, num_latent_tokens=64, vq_codebook_size=256,
        vq_token_dim=12, strict_length=False,
        pixel_vqgan=VQGANConfig(ch=32, ch_mult=(1, 1, 2), num_res_blocks=2, z_channels=32, resolution=64,
                                n_embed=128, embed_dim=32),
    ),
}


def check_weights(sd: dict[str, torch.Tensor]) -> None:
    """Refuse stage-1 weights: without the pixel codebook and decoder there is no image to decode."""
    missing = [k for k in ("pixel_quantize.embedding.weight", "pixel_decoder.conv_in.weight") if k not in sd]
    if missing:
        raise ConfigError(f"this TiTok checkpoint has no pixel stage ({', '.join(missing)} missing): a stage-1 "
                          "tokenizer (finetune_decoder=False) cannot be served on its own")


def infer_config(sd: dict[str, torch.Tensor], heads: int | None = None) -> TiTokConfig:
    """Rebuild the configuration from tensor shapes. What the weights do not record: attention heads
    (`heads`, or the preset of the same width and depth), the strict-length setting (a preset of the
    same shape decides; otherwise the reference's default, strict, which decodes only all N ids)
    and the pixel decoder's hidden channels apart from its multipliers (taken as ch_mult[0] = 1)."""
    check_weights(sd)

    def shape(key: str) -> tuple[int, ...]:
        if key not in sd:
            raise ConfigError(f"cannot infer the TiTok configuration: key {key!r} is missing")
        return tuple(sd[key].shape)

    def count(pattern: str) -> int:
        rx = re.compile(pattern)
        return len({m.group(1) for k in sd if (m := rx.match(k))})

    n_tokens, width = shape("latent_tokens")
    g1 = shape("encoder.positional_embedding")[0]
    grid = int(round((g1 - 1) ** 0.5))
    patch = shape("encoder.patch_embed.weight")[-1]
    dec_width = shape("decoder.positional_embedding")[1]
    layers, dec_layers = count(r"encoder\.transformer\.(\d+)\."), count(r"decoder\.transformer\.(\d+)\.")
    table = {(p.encoder_width, p.encoder_layers): p.encoder_heads for p in PRESETS.values()}
    enc_heads = heads or table.get((width, layers))
    dec_heads = heads or table.get((dec_width, dec_layers))
    if enc_heads is None or dec_heads is None:
        raise ConfigError(f"cannot infer attention heads for a TiTok of width {width} x {layers} layers (no preset "
                          "matches): pass heads explicitly, or put a config.json beside the weights")
    px = "pixel_decoder."
    levels = count(re.escape(px) + r"up\.(\d+)\.")
    ch = shape(f"{px}up.0.block.0.conv2.weight")[0]
    n_embed, embed_dim = shape("pixel_quantize.embedding.weight")
    vq_size, vq_dim = shape("quantize.embedding.weight")
    pixel = VQGANConfig(
        ch=ch, ch_mult=tuple(shape(f"{px}up.{i}.block.0.conv2.weight")[0] // ch for i in range(levels)),
        num_res_blocks=count(re.escape(px) + r"up\.0\.block\.(\d+)\."), z_channels=shape(px + "conv_in.weight")[1],
        resolution=grid * patch, out_ch=shape(px + "conv_out.weight")[0], n_embed=n_embed, embed_dim=embed_dim,
    )
    try:
        cfg = TiTokConfig(
            img_size=grid * patch, patch_size=patch, encoder_width=width, encoder_layers=layers,
            encoder_heads=enc_heads, decoder_width=dec_width, decoder_layers=dec_layers, decoder_heads=dec_heads,
            mlp_ratio=shape("encoder.transformer.0.mlp.c_fc.weight")[0] / width, num_latent_tokens=n_tokens,
            vq_codebook_size=vq_size, vq_token_dim=vq_dim, strict_length=True, pixel_vqgan=pixel,
        ).validate()
    except ConfigError as e:
        raise ConfigError(f"inferred TiTok configuration is inconsistent: {e}") from e
    for p in PRESETS.values():  # a preset of the same shape says whether prefixes decode
        if replace(p, encoder_heads=cfg.encoder_heads, decoder_heads=cfg.decoder_heads, strict_length=True) == cfg:
            return replace(cfg, strict_length=p.strict_length)
    return cfg


# ----------------------------------------------------------------------------------------------
# Probes and limits: a probe is a prefix length
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TiTokLimits(Limits):
    """A probe key IS a prefix length k (1..N). A quality target walks `ladder_step`, 2*`ladder_step`,
    ... up to its cap (N, or `max_tokens`; a cap off the step grid ends the ladder itself); `tokens`
    is one probe, any k in [1, N] for One-D-Piece. A strict-length (TiTok) model has one probe: N."""

    family: ClassVar[str] = "titok"
    positional: ClassVar[bool] = False
    resample: ClassVar[str] = "bilinear"  # the reference resizes with PIL's (antialiased) BILINEAR
    probe_name: ClassVar[tuple[str, str]] = ("prefix", "prefixes")

    num_latent_tokens: int = 256
    ladder_step: int = LADDER_STEP
    strict_length: bool = False

    @classmethod
    def of(cls, cfg: TiTokConfig) -> TiTokLimits:
        return cls(cfg.num_latent_tokens, cfg.ladder_step, cfg.strict_length, image_size=cfg.img_size,
                   codebook=cfg.vq_codebook_size)

    @property
    def max_tokens(self) -> int:
        return self.num_latent_tokens

    @property
    def max_probes(self) -> int:
        return len(self.ladder(None, None, None, None))

    def ladder(self, max_l1: float | None, min_psnr: float | None, tokens: int | None,
               max_tokens: int | None) -> list[int]:
        n = self.num_latent_tokens
        if tokens is not None:
            return [int(tokens)]
        if self.strict_length:
            return [n]
        cap = n if max_tokens is None else int(max_tokens)
        steps = list(range(self.ladder_step, cap + 1, self.ladder_step))
        if not steps or steps[-1] != cap:
            steps.append(cap)
        return steps

    def accepted(self) -> str:
        n = self.num_latent_tokens
        return f"exactly {n} (this model decodes only its full sequence)" if self.strict_length else f"1 to {n}"

    def check_budget(self, field: str, value: int) -> int:
        n = self.num_latent_tokens
        ok = not isinstance(value, bool) and isinstance(value, (int, np.integer))
        if not ok or not (value == n if self.strict_length else 1 <= value <= n):
            raise TargetError(field, f"must be an integer token count; this model takes {self.accepted()}, "
                                     f"got {value!r}")
        return int(value)

    def check_sequence(self, n: int, positions: np.ndarray | None) -> None:
        if not (n == self.num_latent_tokens if self.strict_length else 1 <= n <= self.num_latent_tokens):
            raise TargetError("token_ids", f"a {self.family} token sequence holds {self.accepted()} ids, got {n}")
        if positions is not None:
            raise TargetError("positions", "TiTok / One-D-Piece token ids carry no positions: a sequence of k ids "
                                           "is the prefix of length k")

    def describe(self, probe: int) -> dict[str, Any]:
        return {}  # the key is the prefix length

    def variant(self, halting: bool) -> str:
        return "titok"  # ALIT's 2D-token halting does not apply: a prefix's ids never change

    def token_buckets(self) -> tuple[int, ...]:
        return tuple(self.ladder(None, None, None, None))

    def info(self) -> dict[str, Any]:
        return {"num_latent_tokens": self.num_latent_tokens, "ladder_step": self.ladder_step,
                "strict_length": self.strict_length}


# ----------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------


def _conv1x1(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution applied per token: x (..., C_in) -> (..., C_out)."""
    return F.linear(x, conv.weight.flatten(1), conv.bias)


class ViTEncoder(nn.Module):
    """The reference `TiTokEncoder` (its parameters; the forward pass is `TiTok.encode`)."""

    def __init__(self, cfg: TiTokConfig):
        super().__init__()
        w, s = cfg.encoder_width, cfg.encoder_width**-0.5
        self.class_embedding = nn.Parameter(s * torch.randn(1, w))
        self.positional_embedding = nn.Parameter(s * torch.randn(cfg.num_image_tokens + 1, w))
        self.latent_token_positional_embedding = nn.Parameter(s * torch.randn(cfg.num_latent_tokens, w))
        self.patch_embed = nn.Conv2d(3, w, cfg.patch_size, stride=cfg.patch_size)
        self.ln_pre = nn.LayerNorm(w)
        self.transformer = nn.ModuleList(Block(w, cfg.encoder_heads, cfg.mlp_ratio) for _ in range(cfg.encoder_layers))
        self.ln_post = nn.LayerNorm(w)
        self.conv_out = nn.Conv2d(w, cfg.vq_token_dim, 1)


class ViTDecoder(nn.Module):
    """The reference `TiTokDecoder` (stage 2: `ffn` ends in logits over the pixel codebook)."""

    def __init__(self, cfg: TiTokConfig):
        super().__init__()
        w, s = cfg.decoder_width, cfg.decoder_width**-0.5
        self.class_embedding = nn.Parameter(s * torch.randn(1, w))
        self.positional_embedding = nn.Parameter(s * torch.randn(cfg.num_image_tokens + 1, w))
        self.mask_token = nn.Parameter(s * torch.randn(1, 1, w))
        self.latent_token_positional_embedding = nn.Parameter(s * torch.randn(cfg.num_latent_tokens, w))
        self.decoder_embed = nn.Linear(cfg.vq_token_dim, w)
        self.ln_pre = nn.LayerNorm(w)
        self.transformer = nn.ModuleList(Block(w, cfg.decoder_heads, cfg.mlp_ratio) for _ in range(cfg.decoder_layers))
        self.ln_post = nn.LayerNorm(w)
        self.ffn = nn.Sequential(nn.Conv2d(w, 2 * w, 1), nn.Tanh(), nn.Conv2d(2 * w, cfg.pixel_vqgan.n_embed, 1))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """ln_post'ed grid tokens (..., W) -> logits (..., V): the 1x1-conv head, per token."""
        c0, c2 = self.ffn[0], self.ffn[2]
        assert isinstance(c0, nn.Conv2d) and isinstance(c2, nn.Conv2d)
        return _conv1x1(c2, torch.tanh(_conv1x1(c0, x)))


class _UpLevel(nn.Module):
    """One resolution level of the MaskGIT-VQGAN decoder: ResNet blocks, then (except at full
    resolution) nearest x2 + a 3x3 conv held directly as `upsample_conv`."""

    def __init__(self, blocks: list[ResnetBlock], channels: int, upsample: bool):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        if upsample:
            self.upsample_conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for blk in self.block:
            h = blk(h)
        if hasattr(self, "upsample_conv"):
            h = self.upsample_conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return h


class PixelDecoder(nn.Module):
    """The reference's MaskGIT-VQGAN `Decoder` (`modeling/modules/maskgit_vqgan.py`). Same maths as
    vqgan.Decoder, whose ResnetBlock it uses, but its own parameter layout: `mid.<i>` (num_res_blocks
    blocks, not `mid.block_1/2`) and `up.<i>.upsample_conv` (not `up.<i>.upsample.conv`)."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        c = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = nn.ModuleList(ResnetBlock(cfg, c, c) for _ in range(cfg.num_res_blocks))
        levels: list[_UpLevel] = []
        for i in reversed(range(len(cfg.ch_mult))):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(cfg, c, cfg.ch * cfg.ch_mult[i]))
                c = cfg.ch * cfg.ch_mult[i]
            levels.insert(0, _UpLevel(blocks, c, upsample=i != 0))
        self.up = nn.ModuleList(levels)  # up.0 is full resolution; run from the last
        self.norm_out = nn.GroupNorm(cfg.num_groups, c, eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(c, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for blk in self.mid:
            h = blk(h)
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


@dataclass
class TiTokState:
    image: torch.Tensor  # (3, H, W) preprocessed pixels in [0, 1]
    token_ids: torch.Tensor  # (N,) the image's full sequence, encoded once; a probe k is its prefix [:k]
    iteration: int = 0  # probes run


class TiTok(nn.Module):
    """TiTok / One-D-Piece: parameter names and shapes of the reference state dict (strict loads)."""

    def __init__(self, cfg: TiTokConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        w = cfg.encoder_width
        self.latent_tokens = nn.Parameter(w**-0.5 * torch.randn(cfg.num_latent_tokens, w))
        self.encoder = ViTEncoder(cfg)
        self.decoder = ViTDecoder(cfg)
        self.apply(self._init_weights)  # the reference initialises the ViTs only
        self.quantize = LatentQuantizer(cfg.vq_codebook_size, cfg.vq_token_dim)
        self.pixel_quantize = VectorQuantizer2D(cfg.pixel_vqgan.n_embed, cfg.pixel_vqgan.embed_dim)
        self.pixel_decoder = PixelDecoder(cfg.pixel_vqgan)
        self.batch_mode: BatchMode = "packed"
        self.retry_stricter = False  # family.Tokenizer's option for conditioned families; none here

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @property
    def limits(self) -> TiTokLimits:
        return TiTokLimits.of(self.cfg)

    @property
    def device(self) -> torch.device:
        return self.latent_tokens.device

    @property
    def pixel_codebook(self) -> torch.Tensor:
        return self.pixel_quantize.embedding.weight

    def _check_length(self, k: int) -> int:
        n = self.cfg.num_latent_tokens
        if not (k == n if self.cfg.strict_length else 1 <= k <= n):
            allowed = f"exactly {n} (strict length)" if self.cfg.strict_length else f"1 to {n}"
            raise ValueError(f"a prefix of {k} tokens: this model decodes {allowed} tokens")
        return int(k)

    # ----- encoder ----------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Pixels (B, 3, H, W) in [0, 1] -> the full token ids (B, N), and the intermediates:
        `ln_post` (B, N, W) the latent outputs after ln_post, `prequant` (B, N, D) the quantiser inputs."""
        cfg, enc = self.cfg, self.encoder
        s = cfg.img_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, s, s):
            raise ValueError(f"expected images of shape (B, 3, {s}, {s}), got {tuple(images.shape)}")
        b, g1 = images.shape[0], cfg.num_image_tokens + 1
        patches = enc.patch_embed(images.to(self.device)).flatten(2).transpose(1, 2)  # (B, G, W), row-major
        img = torch.cat([enc.class_embedding.expand(b, 1, -1).to(patches.dtype), patches], dim=1)
        img = img + enc.positional_embedding
        lat = (self.latent_tokens + enc.latent_token_positional_embedding).expand(b, -1, -1)
        x = enc.ln_pre(torch.cat([img, lat.to(img.dtype)], dim=1))
        ys = run_blocks(enc.transformer, list(x), self.batch_mode)
        h = enc.ln_post(torch.stack([y[g1:] for y in ys])).contiguous()  # (B, N, W)
        # the legacy reshape: each image's (N, W) block read as (W, N), then the 1x1 conv over W
        legacy = h.reshape(b, cfg.encoder_width, cfg.num_latent_tokens)
        prequant = _conv1x1(enc.conv_out, legacy.transpose(1, 2))  # (B, N, D)
        return self.quantize(prequant), {"ln_post": h, "prequant": prequant}

    # ----- step API -----------------------------------------------------------------------------
    @torch.no_grad()
    def prepare(self, images: torch.Tensor, seeds: list[int] | None = None) -> list[TiTokState]:
        """Encode a batch (B, 3, H, W) in [0, 1] (one encoder call) into each image's N ids. `seeds`
        is ignored: nothing is drawn."""
        images = images.to(self.device)
        ids, _ = self.encode(images)
        return [TiTokState(image=images[i], token_ids=ids[i]) for i in range(images.shape[0])]

    @torch.no_grad()
    def advance(self, states: list[TiTokState], probes: list[int] | None = None, halting: bool = False,
                stage_timer: Callable[[str], AbstractContextManager] | None = None,
                trace: bool = False) -> list[StepOutput]:
        """One probe per state: the prefix of its ids of the probe's length (default: all N). No
        network runs here; the cost of a probe is its decode. `halting` does not apply."""
        keys = list(probes) if probes is not None else [self.cfg.num_latent_tokens] * len(states)
        if len(keys) != len(states):
            raise ValueError(f"{len(states)} states but {len(keys)} probes")
        lengths = [self._check_length(k) for k in keys]
        outs = [StepOutput(token_ids=s.token_ids[:k], probe=k) for s, k in zip(states, lengths)]
        if trace:
            for o, s in zip(outs, states):
                o.trace = {"all_ids": s.token_ids}
        for s in states:  # only now that everything succeeded
            s.iteration += 1
        return outs

    def step_weight(self, state: TiTokState, probe: int) -> int:
        """The decoder sequence a probe runs: class token, g*g mask tokens and k latents."""
        return self.cfg.num_image_tokens + 1 + int(probe)

    @torch.no_grad()
    def decode_logits(self, token_ids: list[torch.Tensor],
                      positions: list[torch.Tensor | None] | None = None) -> torch.Tensor:
        """Prefixes of any lengths (1..N; strict-length models: N) -> logits (B, G, V), float32, in
        one packed decoder call. Each is decoded as the reference decodes a prefix: the g*g + 1 2D
        tokens first, then its k latents; nothing stands in for the dropped ones, nothing masked."""
        if positions is not None and any(p is not None for p in positions):
            raise ValueError("TiTok token sequences carry no positions (a sequence of k ids is a prefix)")
        cfg, dec = self.cfg, self.decoder
        counts = [self._check_length(int(ids.shape[0])) for ids in token_ids]
        g2 = cfg.num_image_tokens
        two_d = torch.cat([dec.class_embedding, dec.mask_token[0].expand(g2, -1)]) + dec.positional_embedding
        two_d = dec.ln_pre(two_d)  # LayerNorm is per token: once for every sequence
        ids_all = torch.cat([ids.reshape(-1).to(self.device, torch.long) for ids in token_ids])
        code = self.quantize.codes()[ids_all].to(dec.decoder_embed.weight.dtype)  # normalised rows
        pos = torch.cat([dec.latent_token_positional_embedding[:n] for n in counts])
        lat = dec.ln_pre(dec.decoder_embed(code) + pos)
        seqs: list[Seq] = [(two_d, part.to(two_d.dtype)) for part in lat.split(counts)]
        ys = run_blocks(dec.transformer, seqs, self.batch_mode)
        grid = torch.stack([y[1 : g2 + 1] for y in ys])
        return dec.head(dec.ln_post(grid)).float()

    def pixel_code(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits (B, G, V) -> the pixel decoder's input (B, D, g, g): the softmax-weighted average of
        the raw (un-normalised) pixel codebook rows at each grid cell."""
        g = self.cfg.grid_size
        code = logits.float().softmax(-1) @ self.pixel_codebook.float()
        return code.view(code.shape[0], g, g, -1).permute(0, 3, 1, 2)

    @torch.no_grad()
    def reconstruct(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits (B, G, V) -> pixels (B, 3, H, W), float32, not clamped (the reference never clamps)."""
        return self.pixel_decoder(self.pixel_code(logits).to(self.pixel_codebook.dtype)).float()


def card(cfg: TiTokConfig) -> list[tuple[str, str]]:
    """Model-card rows for a TiTok / One-D-Piece configuration."""
    c, p = cfg, cfg.pixel_vqgan
    lengths = (f"exactly {c.num_latent_tokens} (strict length: TiTok)" if c.strict_length
               else f"any prefix 1 to {c.num_latent_tokens} (One-D-Piece); quality ladder every {c.ladder_step}")
    return [
        ("image size / patch / grid", f"{c.img_size} / {c.patch_size} / {c.grid_size}x{c.grid_size}"),
        ("encoder / decoder", f"{c.encoder_width}w x {c.encoder_layers}L x {c.encoder_heads}h / "
                              f"{c.decoder_width}w x {c.decoder_layers}L x {c.decoder_heads}h"),
        ("1D tokens", f"{c.num_latent_tokens}, codebook {c.vq_codebook_size} x {c.vq_token_dim} (L2-normalised)"),
        ("decodable lengths", lengths),
        ("pixel stage", f"MaskGIT-VQGAN decoder, codebook {p.n_embed} x {p.embed_dim}, soft code"),
        ("preprocessing", "shorter side to the input size with PIL bilinear (reference inference script), "
                          "centre crop, [0, 1]"),
    ]


FAMILY = Family(
    name="titok", model=TiTok, config=TiTokConfig, presets=PRESETS,
    marker="pixel_quantize.embedding.weight", reference_key="model", infer_config=infer_config,
    card=card, verifier="service.verify_titok:verify_titok", check_weights=check_weights,
)
