"""Loading and converting ALIT weights.

Accepted inputs:
* a published `.pth` (`torch.save` of a dict with `ema` and/or `model`, or a bare state dict),
  read with `torch.load(weights_only=True)` only: a pickle that would run code is refused;
* a `.safetensors` file with our `config.json` beside it (what `alit-serve convert` writes);
* a directory holding either.

The configuration comes from a `config.json` beside the weights when there is one (ours or the
reference fixture's layout), else it is inferred from the state dict's shapes (attention heads,
which leave no trace in the weights, from the preset table or an explicit override).
Training-only entries (`gan_losses.*`: LPIPS + discriminators) are dropped before a strict load.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .alit import ALIT
from .config import ALITConfig, ConfigError, VQGANConfig
from .presets import get_preset, heads_for

TRAINING_ONLY_PREFIXES = ("gan_losses.",)
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(ValueError):
    """The weights cannot be read or do not fit the model."""


class CheckpointMismatch(CheckpointError):
    def __init__(self, missing: list[str], unexpected: list[str], wrong_shape: list[tuple[str, tuple, tuple]]):
        self.missing, self.unexpected, self.wrong_shape = missing, unexpected, wrong_shape
        lines = ["checkpoint does not match the model:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): " + ", ".join(missing))
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): " + ", ".join(unexpected))
        if wrong_shape:
            lines.append(
                f"  wrongly-shaped keys ({len(wrong_shape)}): "
                + ", ".join(f"{k} (checkpoint {list(a)}, model {list(b)})" for k, a, b in wrong_shape)
            )
        super().__init__("\n".join(lines))


@dataclass
class LoadedModel:
    model: ALIT
    config: ALITConfig
    fingerprint: str
    source: str


# ----- reading ------------------------------------------------------------------------------------


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a `.pth` or `.safetensors` file, training-only entries dropped."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read {path}: {e}") from e
    else:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            detail = next((line.strip().split(". Please")[0] for line in str(e).splitlines()
                           if "Unsupported global" in line), None)
            if detail is None:
                first = str(e).splitlines()[0][:200]
                raise CheckpointError(f"cannot read {path}: not a PyTorch checkpoint ({first})") from e
            raise CheckpointError(
                f"refusing to load {path}: besides tensors it holds pickled objects that would run code "
                f"when unpickled ({detail}). Only plain weights are loaded; re-save the state dict alone "
                f"(torch.save({{'ema': state_dict}}, ...)) from a trusted environment."
            ) from e
        except Exception as e:
            raise CheckpointError(f"cannot read {path}: {e}") from e
        sd = _select_weights(obj, path)
    out = {}
    for k, v in sd.items():
        for p in WRAPPER_PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
        if not k.startswith(TRAINING_ONLY_PREFIXES):
            out[k] = v
    return out


def _select_weights(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("ema", "model", "state_dict"):
            if isinstance(obj.get(key), dict):
                return obj[key]
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise CheckpointError(f"{path}: no state dict found (expected a dict with 'ema', 'model' or tensors)")


def read_config_file(path: str | Path) -> ALITConfig:
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read config {path}: {e}") from e
    try:
        return ALITConfig.from_reference_json(d)
    except (ConfigError, KeyError, TypeError) as e:
        raise CheckpointError(f"invalid config {path}: {e}") from e


# ----- inferring the configuration ---------------------------------------------------------------


def infer_config(sd: dict[str, torch.Tensor], heads: int | None = None) -> ALITConfig:
    """Rebuild the configuration from tensor shapes; `heads` overrides the preset-table lookup."""

    def shape(k: str) -> tuple[int, ...]:
        if k not in sd:
            raise CheckpointError(f"cannot infer the model configuration: key {k!r} is missing")
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
        raise CheckpointError(
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
        raise CheckpointError(f"inferred configuration is inconsistent: {e}") from e


# ----- loading -------------------------------------------------------------------------------------


def check_state_dict(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Raise one error naming every missing, unexpected and wrongly-shaped key."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [(k, tuple(sd[k].shape), tuple(own[k].shape)) for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise CheckpointMismatch(missing, unexpected, wrong)


def fingerprint(model: torch.nn.Module, cfg: ALITConfig) -> str:
    """sha256 over the canonical config and every tensor (name, dtype, shape, bytes)."""
    h = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode())
    for k, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{k}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _locate(path: Path) -> tuple[Path, Path | None]:
    """(weights file, config.json or None) for a file or a directory."""
    if path.is_dir():
        for name in ("model.safetensors", "checkpoint.pth"):
            if (path / name).is_file():
                cfg = path / "config.json"
                return path / name, cfg if cfg.is_file() else None
        weights = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.pth"))
        if not weights:
            raise CheckpointError(f"no .safetensors or .pth file in {path}")
        path = weights[0]
    cfg = path.with_name("config.json")
    return path, cfg if cfg.is_file() else None


def build_model(cfg: ALITConfig, sd: dict[str, torch.Tensor] | None = None, seed: int = 0) -> ALIT:
    """A model in eval mode: the given weights (strictly), or a seeded random initialisation."""
    torch.manual_seed(seed)
    model = ALIT(cfg)
    if sd is not None:
        check_state_dict(model, sd)
        model.load_state_dict(sd, strict=True)
    return model.eval()


def load_model(path: str | Path, heads: int | None = None, config: ALITConfig | None = None) -> LoadedModel:
    weights, cfg_path = _locate(Path(path))
    sd = read_state_dict(weights)
    if config is None:
        config = read_config_file(cfg_path) if cfg_path is not None else infer_config(sd, heads)
    model = build_model(config, sd)
    return LoadedModel(model, config, fingerprint(model, config), str(weights))


def load_preset(name: str, seed: int = 0) -> LoadedModel:
    """A preset with random weights (seeded): for tests and until a trained default exists."""
    cfg = get_preset(name)
    model = build_model(cfg, seed=seed)
    return LoadedModel(model, cfg, fingerprint(model, cfg), f"preset:{name}:seed{seed}")


# ----- converting -----------------------------------------------------------------------------------


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export(model: ALIT, out_dir: str | Path, card: str | None = None) -> str:
    """Write a model as a servable folder: `model.safetensors` (its fingerprint in the metadata),
    our `config.json` and, when given, `MODEL_CARD.md`. Returns the fingerprint. `convert` and
    training's export both write through here; `load_model(out_dir)` reads it back."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fp = fingerprint(model, model.cfg)
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}  # no shared storage
    save_file(tensors, str(out / "model.safetensors"), metadata={"fingerprint": fp})
    (out / "config.json").write_text(json.dumps(model.cfg.to_dict(), indent=2) + "\n")
    if card is not None:
        (out / "MODEL_CARD.md").write_text(card)
    return fp


def convert(src: str | Path, out_dir: str | Path, heads: int | None = None) -> LoadedModel:
    """Write `model.safetensors`, `config.json` and `MODEL_CARD.md` for a checkpoint."""
    loaded = load_model(src, heads=heads)
    out = Path(out_dir)
    export(loaded.model, out)
    c = loaded.config
    n_params = sum(t.numel() for t in loaded.model.state_dict().values())
    (out / "MODEL_CARD.md").write_text(
        f"# ALIT model\n\n"
        f"| field | value |\n|---|---|\n"
        f"| source | `{Path(loaded.source).name}` (sha256 `{_sha256_file(Path(loaded.source))}`) |\n"
        f"| model.safetensors sha256 | `{_sha256_file(out / 'model.safetensors')}` |\n"
        f"| fingerprint (config + weights) | `{loaded.fingerprint}` |\n"
        f"| parameters | {n_params:,} |\n"
        f"| image size / patch / grid | {c.img_size} / {c.patch_size} / {c.grid_size}x{c.grid_size} |\n"
        f"| encoder / decoder | {c.encoder_width}w x {c.encoder_layers}L x {c.encoder_heads}h / "
        f"{c.decoder_width}w x {c.decoder_layers}L x {c.decoder_heads}h |\n"
        f"| 1D tokens | {c.tokens_per_iter} per iteration, up to {c.max_tokens}, codebook "
        f"{c.vq_codebook_size} x {c.vq_token_dim} |\n"
        f"| VQGAN codebook | {c.vqgan.n_embed} x {c.vqgan.embed_dim} |\n"
    )
    return loaded
