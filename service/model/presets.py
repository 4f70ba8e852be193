"""Named model configurations: the published ALIT sizes and a tiny one for tests and CPU demos."""

from __future__ import annotations

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
