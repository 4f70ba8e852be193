"""Model configuration: every shape of the network comes from here, nothing is hard-coded.

`ALITConfig` describes the latent-distillation encoder/decoder and nests a `VQGANConfig` for the
base 2D tokenizer. Both round-trip through plain dicts (our `config.json`), and
`from_reference_json` reads the constructor arguments recorded by the reference implementation
(the layout of `fixtures/alit-reference/config.json`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, get_args

# How a step's sequences of different lengths share a call (transformer.run_blocks), named here where
# nothing imports torch, so the command line offers them without loading it.
BatchMode = Literal["packed", "cohort", "padded", "varlen"]
BATCH_MODES: tuple[str, ...] = get_args(BatchMode)


class ConfigError(ValueError):
    """A configuration that cannot describe a working model."""


@dataclass(frozen=True)
class VQGANConfig:
    """The MaskGIT-flavoured taming VQGAN shipped with ALIT (no attention, no quant_conv)."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 256
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    n_embed: int = 1024
    embed_dim: int = 256
    dropout: float = 0.0
    num_groups: int = 32
    norm_eps: float = 1e-6

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def grid_size(self) -> int:
        return self.resolution // self.downsample_factor

    def validate(self) -> None:
        if self.z_channels != self.embed_dim:
            raise ConfigError(
                f"VQGAN z_channels ({self.z_channels}) must equal embed_dim ({self.embed_dim}): "
                "the ALIT VQGAN has no quant_conv"
            )
        if self.resolution % self.downsample_factor:
            raise ConfigError(
                f"VQGAN resolution {self.resolution} is not divisible by its downsampling "
                f"factor {self.downsample_factor}"
            )
        for c in {self.ch * m for m in self.ch_mult}:
            if c % self.num_groups:
                raise ConfigError(f"VQGAN channel count {c} is not divisible by {self.num_groups} groups")


class PatchGrid:
    """What every family's configuration derives from `img_size` and `patch_size`, and the checks
    they share; each family's frozen config dataclass inherits it (config.py, karl.py, titok.py)."""

    img_size: int
    patch_size: int

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_image_tokens(self) -> int:
        return self.grid_size**2

    def check_grid(self) -> None:
        if self.img_size % self.patch_size:
            raise ConfigError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")

    def check_heads(self) -> None:
        """Encoder and decoder widths split evenly into their attention heads."""
        for name in ("encoder", "decoder"):
            width, heads = getattr(self, f"{name}_width"), getattr(self, f"{name}_heads")
            if width < 1 or heads < 1 or width % heads:
                raise ConfigError(f"{name}_width {width} is not divisible by {name}_heads {heads}")


def known_fields(cls: type, d: dict[str, Any], what: str) -> None:
    """ConfigError naming every key of `d` that is no field of the dataclass `cls`."""
    unknown = set(d) - {f.name for f in fields(cls)}
    if unknown:
        raise ConfigError(f"unknown {what} config fields: {sorted(unknown)}")


def vqgan_from_dict(d: dict[str, Any], what: str = "VQGAN") -> VQGANConfig:
    """A nested VQGAN block of a config dict (strict; `ch_mult` as a tuple)."""
    vq = dict(d)
    known_fields(VQGANConfig, vq, what)
    if "ch_mult" in vq:
        vq["ch_mult"] = tuple(vq["ch_mult"])
    return VQGANConfig(**vq)


@dataclass(frozen=True)
class ALITConfig(PatchGrid):
    """Adaptive-length image tokenizer (ALIT) hyper-parameters, named after the reference."""

    img_size: int = 256
    patch_size: int = 16
    encoder_width: int = 512
    encoder_layers: int = 8
    encoder_heads: int = 8
    decoder_width: int = 512
    decoder_layers: int = 8
    decoder_heads: int = 8
    mlp_ratio: float = 4.0
    vq_codebook_size: int = 4096
    vq_token_dim: int = 12
    tokens_per_iter: int = 32
    max_iters: int = 8
    decoder_max_latent_tokens: int = 256
    halting_threshold: float = 0.55
    vqgan: VQGANConfig = field(default_factory=VQGANConfig)

    # ----- derived quantities -------------------------------------------------------------
    @property
    def max_tokens(self) -> int:
        return self.tokens_per_iter * self.max_iters

    def validate(self) -> ALITConfig:
        self.vqgan.validate()
        self.check_grid()
        if self.vqgan.resolution != self.img_size:
            raise ConfigError(
                f"VQGAN resolution {self.vqgan.resolution} differs from img_size {self.img_size}"
            )
        if self.vqgan.grid_size != self.grid_size:
            raise ConfigError(
                f"VQGAN grid {self.vqgan.grid_size} differs from the patch grid {self.grid_size} "
                f"(img_size {self.img_size} / patch_size {self.patch_size})"
            )
        if self.encoder_width <= self.vqgan.embed_dim:
            raise ConfigError(
                f"encoder_width ({self.encoder_width}) must exceed the VQGAN embed_dim "
                f"({self.vqgan.embed_dim}): the patch embedding gets the difference"
            )
        self.check_heads()
        if self.max_tokens > self.decoder_max_latent_tokens:
            raise ConfigError(
                f"{self.max_iters} iterations x {self.tokens_per_iter} tokens exceed the decoder's "
                f"{self.decoder_max_latent_tokens} latent positions"
            )
        return self

    # ----- serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["vqgan"]["ch_mult"] = list(self.vqgan.ch_mult)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ALITConfig:
        d = dict(d)
        known_fields(cls, d, "ALIT")
        vqgan = vqgan_from_dict(d.pop("vqgan", {}))
        return cls(**d, vqgan=vqgan).validate()

    @classmethod
    def from_reference_json(cls, d: dict[str, Any]) -> ALITConfig:
        """Read a reference-style description: `alit_constructor_kwargs` plus a `vqgan` block."""
        if "alit_constructor_kwargs" not in d:
            return cls.from_dict(d)
        k = d["alit_constructor_kwargs"]
        if not k.get("quantize_latent", True):
            raise ConfigError("continuous-latent ALIT checkpoints are not supported: "
                              "a tokenizer needs quantize_latent=True")
        v = d["vqgan"]
        dd = v["ddconfig"]
        gn = v.get("group_norm", {})
        vqgan = VQGANConfig(
            ch=dd["ch"], ch_mult=tuple(dd["ch_mult"]), num_res_blocks=dd["num_res_blocks"],
            z_channels=dd["z_channels"], resolution=dd["resolution"], in_channels=dd["in_channels"],
            out_ch=dd["out_ch"], n_embed=v["n_embed"], embed_dim=v["embed_dim"],
            dropout=dd.get("dropout", 0.0), num_groups=gn.get("num_groups", 32), norm_eps=gn.get("eps", 1e-6),
        )
        return cls(
            img_size=k["img_size"], patch_size=k["patch_size"],
            encoder_width=k["encoder_width"], encoder_layers=k["encoder_num_layers"],
            encoder_heads=k["encoder_num_heads"], decoder_width=k["decoder_width"],
            decoder_layers=k["decoder_num_layers"], decoder_heads=k["decoder_num_heads"],
            mlp_ratio=d.get("mlp_ratio", 4.0), vq_codebook_size=k["vq_codebook_size"],
            vq_token_dim=k["vq_token_dim"], tokens_per_iter=k["num_init_latent_tokens"],
            max_iters=k["max_rollout_iters"],
            decoder_max_latent_tokens=d.get("decoder_max_latent_tokens", 256),
            halting_threshold=k.get("dynamic_halting_threshold", 0.55), vqgan=vqgan,
        ).validate()
