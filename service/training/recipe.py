"""The default model's recipe: configuration and every training hyper-parameter in one place."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..model.config import ALITConfig, VQGANConfig
from .stage2 import Stage2Params

DEFAULT_VQGAN = VQGANConfig(
    ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, z_channels=32, embed_dim=32, resolution=64,
    n_embed=256, num_groups=8,
)

DEFAULT_CONFIG = ALITConfig(
    img_size=64, patch_size=4,
    encoder_width=64, encoder_layers=2, encoder_heads=2,
    decoder_width=64, decoder_layers=2, decoder_heads=2,
    mlp_ratio=4.0, vq_codebook_size=1024, vq_token_dim=12, tokens_per_iter=32, max_iters=8,
    decoder_max_latent_tokens=256, halting_threshold=0.55, vqgan=DEFAULT_VQGAN,
)


# The model the GPU job trains (`python -m service.training gpu-job`): 128 px, a deeper VQGAN with a
# 1024-code book (8x down to the same 16x16 grid), a 256-wide transformer. Sized for what about ten
# minutes of one H100/H200 can train; docs/training.md ("Sizing the GPU model") has the CPU probes
# behind the choice.
GPU_VQGAN = VQGANConfig(
    ch=64, ch_mult=(1, 1, 2, 2), num_res_blocks=2, z_channels=32, embed_dim=32, resolution=128,
    n_embed=1024, num_groups=32,
)

GPU_CONFIG = ALITConfig(
    img_size=128, patch_size=8,
    encoder_width=256, encoder_layers=4, encoder_heads=4,
    decoder_width=256, decoder_layers=4, decoder_heads=4,
    mlp_ratio=4.0, vq_codebook_size=1024, vq_token_dim=12, tokens_per_iter=32, max_iters=8,
    decoder_max_latent_tokens=256, halting_threshold=0.55, vqgan=GPU_VQGAN,
)

CONFIGS = {"default": DEFAULT_CONFIG, "gpu128": GPU_CONFIG}


@dataclass
class Recipe:
    seed: int = 0
    pool_size: int = 24000
    # stage 1: VQGAN
    s1_steps: int = 1500
    s1_batch: int = 16
    s1_lr: float = 1e-3
    # stage 2: latent distillation (all iterations unrolled, halting on)
    s2: Stage2Params = field(default_factory=lambda: Stage2Params(steps=2500, a_steps=1000))
    # stage 2b: all 8 iterations unrolled on every step, late iterations weighted up
    s2b: Stage2Params = field(default_factory=lambda: Stage2Params(
        steps=600, a_steps=0, b_batch=8, lr=1e-3, warmup=30, p_full=1.0, combine="ramp", init=False,
        name="stage2b", eval_every=50))
    # stage 2c: the same again at a lower learning rate (a separate phase with its own schedule)
    s2c: Stage2Params = field(default_factory=lambda: Stage2Params(
        steps=600, a_steps=0, b_batch=8, lr=7e-4, warmup=20, p_full=1.0, combine="ramp", init=False,
        name="stage2c", eval_every=50))
    # stage 2d: once more, lower still
    s2d: Stage2Params = field(default_factory=lambda: Stage2Params(
        steps=700, a_steps=0, b_batch=8, lr=5e-4, warmup=20, p_full=1.0, combine="ramp", init=False,
        name="stage2d", eval_every=50))
    # stage 3: VQGAN-decoder fine-tune on the model's own soft codes (0 = skip)
    s3_steps: int = 300
    s3_batch: int = 8
    s3_lr: float = 2e-4

    def to_dict(self) -> dict:
        return asdict(self)


def quick_recipe() -> Recipe:
    """A few steps of everything: for tests and smoke runs (the result is not a usable model)."""
    return Recipe(
        pool_size=64, s1_steps=4, s1_batch=4,
        s2=Stage2Params(steps=4, a_steps=2, a_batch=2, b_batch=2, p_full=1.0, eval_every=2, ckpt_every=2),
        s2b=Stage2Params(steps=2, a_steps=0, b_batch=2, p_full=1.0, combine="ramp", init=False, name="stage2b",
                         eval_every=2, ckpt_every=2),
        s2c=Stage2Params(steps=2, a_steps=0, b_batch=2, p_full=1.0, combine="ramp", init=False, name="stage2c",
                         eval_every=2, ckpt_every=2),
        s2d=Stage2Params(steps=2, a_steps=0, b_batch=2, p_full=1.0, combine="ramp", init=False, name="stage2d",
                         eval_every=2, ckpt_every=2),
        s3_steps=2, s3_batch=2,
    )
