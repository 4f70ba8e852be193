"""The model configuration (`service/model/config.py`): nothing is hard-coded; other image sizes,
grids, token counts and iteration counts work. (The service's settings: tests/test_settings.py.)"""

from __future__ import annotations

import pytest
import torch

from service.model.alit import ALIT
from service.model.config import ALITConfig, ConfigError, VQGANConfig
from service.model.presets import PRESETS, get_preset


def small_cfg() -> ALITConfig:
    # 48 px, patch 6 -> 8x8 grid; 16 tokens per iteration x 3 iterations; VQGAN 48 -> 8 (x6? no: /2^n)
    return ALITConfig(
        img_size=32, patch_size=4, encoder_width=96, encoder_layers=1, encoder_heads=3,
        decoder_width=64, decoder_layers=1, decoder_heads=4, vq_codebook_size=64, vq_token_dim=8,
        tokens_per_iter=16, max_iters=3, decoder_max_latent_tokens=64,
        vqgan=VQGANConfig(ch=32, ch_mult=(1, 1, 2, 2)[:3], num_res_blocks=1, z_channels=32, resolution=32,
                          n_embed=50, embed_dim=32),
    ).validate()


def test_non_default_shapes_run_end_to_end():
    cfg = small_cfg()
    assert cfg.grid_size == 8 and cfg.max_tokens == 48
    torch.manual_seed(0)
    m = ALIT(cfg).eval()
    imgs = torch.rand(2, 3, 32, 32)
    states = m.prepare(imgs)
    assert states[0].x.shape == (8 * 8 + 1 + 16, 96)
    for k in range(3):
        outs = m.advance(states, halting=True)
        assert outs[0].token_ids.shape == (16 * (k + 1),)
        assert outs[0].logits.shape == (64, 50)
    assert all(s.finished for s in states)
    assert m.reconstruct_ids([outs[0].token_ids]).shape == (1, 3, 32, 32)


def test_config_round_trips_and_rejects_inconsistency():
    cfg = small_cfg()
    assert ALITConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown ALIT config fields"):
        ALITConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(ConfigError, match="grid"):
        ALITConfig.from_dict({**cfg.to_dict(), "patch_size": 8, "img_size": 32})
    with pytest.raises(ConfigError, match="divisible by encoder_heads"):
        ALITConfig.from_dict({**cfg.to_dict(), "encoder_heads": 5})
    with pytest.raises(ConfigError, match="exceed the decoder"):
        ALITConfig.from_dict({**cfg.to_dict(), "max_iters": 5})


@pytest.mark.parametrize("name", ["alit_tiny", "alit_small", "alit_base", "alit_semilarge"])
def test_published_presets_build_with_published_shapes(name):
    cfg = get_preset(name)
    with torch.device("meta"):
        m = ALIT(cfg)
    sd = m.state_dict()
    w = cfg.encoder_width
    assert sd["encoder_positional_embedding"].shape == (257, w)
    assert sd["timestep_embedding"].shape == (8, 32, w)
    assert sd["quantize.embedding.weight"].shape == (4096, 12)
    assert sd["decoder.ffn.2.weight"].shape == (1024, 2 * w)
    assert sd["patch_embed.weight"].shape == (w - 256, 3, 16, 16)
    assert sd["base_tokenizer.vqgan.quantize.embedding.weight"].shape == (1024, 256)
    assert sd[f"encoder.transformer.{cfg.encoder_layers - 1}.attn.in_proj_weight"].shape == (3 * w, w)
    assert f"encoder.transformer.{cfg.encoder_layers}.ln_1.weight" not in sd
    # MaskGIT VQGAN: 5 levels x 2 blocks, no attention, no quant_conv
    assert "base_tokenizer.vqgan.encoder.down.4.block.1.conv2.weight" in sd
    assert not any("attn" in k or "quant_conv" in k for k in sd if k.startswith("base_tokenizer"))


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ConfigError, match="alit_base"):
        get_preset("alit_huge")
    assert set(PRESETS) >= {"alit_tiny", "alit_small", "alit_base", "alit_semilarge", "test_tiny"}
