"""The base 2D tokenizer: the MaskGIT-flavoured taming VQGAN that ALIT ships with.

Differences from stock taming that the published weights depend on: no attention blocks, no
quant_conv / post_quant_conv, bias-free `conv_in` (encoder) and ResNet convolutions, average-pool
downsampling, nearest-neighbour + conv upsampling, and a channel-changing ResNet block that applies
its 1x1 `nin_shortcut` to the residual branch's *output* (returning `nin(h) + h`).
Parameter names follow the published state dict (`encoder.down.0.block.0.conv1.weight`, ...).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import VQGANConfig


def _norm(cfg: VQGANConfig, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(cfg.num_groups, channels, eps=cfg.norm_eps)


class ResnetBlock(nn.Module):
    def __init__(self, cfg: VQGANConfig, c_in: int, c_out: int):
        super().__init__()
        self.norm1 = _norm(cfg, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.norm2 = _norm(cfg, c_out)
        self.dropout = nn.Dropout(cfg.dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.nin_shortcut = nn.Conv2d(c_out, c_out, 1, bias=False) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        # As published: the shortcut projects h, not x, when the channel count changes.
        return (self.nin_shortcut(h) if self.nin_shortcut is not None else x) + h


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: `block` (ResNet blocks) and, except at one end, a resampler."""

    def __init__(self, blocks: list[ResnetBlock], upsample: Upsample | None = None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        if upsample is not None:
            self.upsample = upsample

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            h = block(h)
        return self.upsample(h) if hasattr(self, "upsample") else h


class _Mid(nn.Module):
    def __init__(self, cfg: VQGANConfig, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(cfg, channels, channels)
        self.block_2 = ResnetBlock(cfg, channels, channels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.block_1(h))


class Encoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1, bias=False)
        self.down = nn.ModuleList()
        c = cfg.ch
        for mult in cfg.ch_mult:
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(cfg, c, cfg.ch * mult))
                c = cfg.ch * mult
            self.down.append(_Level(blocks))
        self.mid = _Mid(cfg, c)
        self.norm_out = _norm(cfg, c)
        self.conv_out = nn.Conv2d(c, cfg.z_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        last = len(self.down) - 1
        for i, level in enumerate(self.down):
            h = level(h)
            if i != last:
                h = F.avg_pool2d(h, kernel_size=2, stride=2)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        c = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = _Mid(cfg, c)
        levels: list[_Level] = []
        for i in reversed(range(len(cfg.ch_mult))):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(cfg, c, cfg.ch * cfg.ch_mult[i]))
                c = cfg.ch * cfg.ch_mult[i]
            levels.insert(0, _Level(blocks, Upsample(c) if i != 0 else None))
        self.up = nn.ModuleList(levels)  # indexed by resolution level, run from the last
        self.norm_out = _norm(cfg, c)
        self.conv_out = nn.Conv2d(c, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer2D(nn.Module):
    """Nearest-code lookup over the VQGAN codebook (squared Euclidean distance, raw rows)."""

    def __init__(self, n_embed: int, embed_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H*W) code indices, row-major over the grid."""
        b = z.shape[0]
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).float()
        e = self.embedding.weight.float()
        d = flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * flat @ e.t()
        return d.argmin(dim=1).view(b, -1)


class VQGAN(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer2D(cfg.n_embed, cfg.embed_dim)

    @property
    def codebook(self) -> torch.Tensor:
        return self.quantize.embedding.weight

    def encode(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels in [0, 1] -> (unquantised z (B, C, g, g), nearest-code indices (B, g*g))."""
        z = self.encoder(img)
        return z, self.quantize.indices(z)

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        """Code map (B, C, g, g) -> pixels (B, 3, H, W), not clamped."""
        return self.decoder(code)

    def decode_soft(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits over the codebook at each grid cell (B, g*g, V), row-major -> pixels (B, 3, H, W),
        float32, not clamped: the softmax-weighted code (raw rows), then the decoder. How the latent
        decoders of every family here turn their logits into an image."""
        g = self.cfg.grid_size
        code = logits.float().softmax(-1) @ self.codebook.float()
        code = code.view(code.shape[0], g, g, -1).permute(0, 3, 1, 2)
        return self.decode(code.to(self.codebook.dtype)).float()
