"""Named model configurations: the published ALIT sizes and a tiny one for tests and CPU demos."""

from __future__ import annotations

import re

import torch

from .config import ALITConfig, ConfigError, VQGANConfig

# The VQGAN every published ALIT checkpoint embeds (MaskGIT's ImageNet VQGAN).
PUBLISHED_VQGAN = VQGANConfig(
    ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=256, resolution=256,
    n_embed=1024, embed_dim=256,
)


def _published(width: int, layers: int, heads: int) -> ALITConfig:
    return ALITConfig(
        img_size=256, patch_size=16,
        encoder_width=width, encoder_layers=layers, encoder_heads=heads,
        decoder_width=width, decoder_layers=layers, decoder_heads=heads,
        vq_codebook_size=4096, vq_token_dim=12, tokens_per_iter=32, max_iters=8,
        vqgan=PUBLISHED_VQGAN,
    )


PRESETS: dict[str, ALITConfig] = {
    "alit_tiny": _published(512, 8, 8),
    "alit_small": _published(1024, 8, 8),
    "alit_base": _published(768, 12, 12),
    "alit_semilarge": _published(1024, 16, 16),
    # The shape of the reference fixture: 64 px, 16x16 grid, 64 wide. Fast enough for CPU tests.
    "test_tiny": ALITConfig(
        img_size=64, patch_size=4,
        encoder_width=64, encoder_layers=2, encoder_heads=2,
        decoder_width=64, decoder_layers=2, decoder_heads=2,
        vq_codebook_size=256, vq_token_dim=12, tokens_per_iter=32, max_iters=8,
        vqgan=VQGANConfig(ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, z_channels=32, resolution=64,
                          n_embed=128, embed_dim=32),
    ),
}


def get_preset(name: str) -> ALITConfig:
    try:
        return PRESETS[name].validate()
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None


def heads_for(width: int, layers: int) -> int | None:
    """Attention heads of the preset with this width and depth (heads leave no trace in weights)."""
    for cfg in PRESETS.values():
        if (cfg.encoder_width, cfg.encoder_layers) == (width, layers):
            return cfg.encoder_heads
    return None


def preset_name_of(cfg: ALITConfig) -> str | None:
    for name, p in PRESETS.items():
        if p == cfg:
            return name
    return None


def infer_config(sd: dict[str, torch.Tensor], heads: int | None = None) -> ALITConfig:
    """Rebuild an ALIT configuration from tensor shapes; `heads` overrides the preset-table lookup."""

    def shape(k: str) -> tuple[int, ...]:
        if k not in sd:
            raise ConfigError(f"cannot infer the model configuration: key {k!r} is missing")
        return tuple(sd[k].shape)

    def count(pattern: str) -> int:
        rx = re.compile(pattern)
        return len({m.group(1) for k in sd if (m := rx.match(k))})

    v = "base_tokenizer.vqgan."
    ch = shape(v + "encoder.conv_in.weight")[0]
    n_levels = count(re.escape(v) + r"encoder\.down\.(\d+)\.")
    ch_mult = tuple(shape(f"{v}encoder.down.{i}.block.0.conv1.weight")[0] // ch for i in range(n_levels))
    n_embed, embed_dim = shape(v + "quantize.embedding.weight")
    g1, width = shape("encoder_positional_embedding")
    grid = int(round((g1 - 1) ** 0.5))
    patch = shape("patch_embed.weight")[-1]
    enc_layers = count(r"encoder\.transformer\.(\d+)\.")
    dec_layers = count(r"decoder\.transformer\.(\d+)\.")
    dec_width = shape("decoder_positional_embedding")[1]
    enc_heads = heads or heads_for(width, enc_layers)
    dec_heads = heads or heads_for(dec_width, dec_layers)
    if enc_heads is None or dec_heads is None:
        raise ConfigError(
            f"cannot infer attention heads for width {width} x {enc_layers} layers (no preset matches): "
            "pass --heads, or put a config.json beside the weights"
        )
    vq_size, vq_dim = shape("quantize.embedding.weight")
    iters, t, _ = shape("timestep_embedding")
    vqgan = VQGANConfig(
        ch=ch, ch_mult=ch_mult, num_res_blocks=count(re.escape(v) + r"encoder\.down\.0\.block\.(\d+)\."),
        z_channels=shape(v + "encoder.conv_out.weight")[0], resolution=grid * patch,
        in_channels=shape(v + "encoder.conv_in.weight")[1], out_ch=shape(v + "decoder.conv_out.weight")[0],
        n_embed=n_embed, embed_dim=embed_dim,
    )
    try:
        return ALITConfig(
            img_size=grid * patch, patch_size=patch,
            encoder_width=width, encoder_layers=enc_layers, encoder_heads=enc_heads,
            decoder_width=dec_width, decoder_layers=dec_layers, decoder_heads=dec_heads,
            mlp_ratio=shape("encoder.transformer.0.mlp.c_fc.weight")[0] / width,
            vq_codebook_size=vq_size, vq_token_dim=vq_dim, tokens_per_iter=t, max_iters=iters,
            decoder_max_latent_tokens=shape("decoder.latent_token_positional_embedding")[0], vqgan=vqgan,
        ).validate()
    except ConfigError as e:
        raise ConfigError(f"inferred configuration is inconsistent: {e}") from e
