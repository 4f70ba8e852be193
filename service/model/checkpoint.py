"""Loading and converting the weights of every family (ALIT, KARL, ...: model/registry.py).

Accepted inputs:
* a published `.pth` or `.bin` (`torch.save` of a dict with `ema` and/or `model`, or a bare state dict:
  One-D-Piece's `pytorch_model.bin`),
  read with `torch.load(weights_only=True)` only: a pickle that would run code is refused;
* a `.safetensors` file with our `config.json` beside it (what `alit-serve convert` writes);
* a directory holding either.

The configuration comes from a `config.json` beside the weights when there is one (ours or the
reference fixture's layout), else from the one `.yaml` there (a reference's training config: the
released One-D-Piece / TiTok layout), else it is inferred from the state dict's shapes (attention heads,
which leave no trace in the weights, from the preset table or an explicit override); the family
comes from the config, or from a key only its weights hold. Training-only entries (`gan_losses.*`:
LPIPS + discriminators) are dropped before a strict load, which reports every mismatch at once.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from . import registry
from .config import ConfigError
from .family import Family, Limits

TRAINING_ONLY_PREFIXES = ("gan_losses.",)
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
YAML_SUFFIXES = (".yaml", ".yml")


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
    model: Any  # the family's network (a `family.Tokenizer` and torch module)
    config: Any  # the family's configuration
    fingerprint: str
    source: str
    family: Family

    @property
    def limits(self) -> Limits:
        return self.model.limits


# ----- reading ------------------------------------------------------------------------------------


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a `.pth` / `.bin` or `.safetensors` file, training-only entries dropped."""
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


def read_config_file(path: str | Path) -> Any:
    """A config.json (ours, or a reference fixture's) or a reference's yaml (One-D-Piece / TiTok
    publish theirs as `configs/*.yaml`) as its family's configuration."""
    path = Path(path)
    try:
        text = path.read_text()
        d = _yaml(text) if path.suffix in YAML_SUFFIXES else json.loads(text)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read config {path}: {e}") from e
    if not isinstance(d, dict):
        raise CheckpointError(f"invalid config {path}: not a mapping")
    try:
        family = registry.family_of_config_dict(d)
        return family.config.from_reference_json({k: v for k, v in d.items() if k != "family"})
    except (ConfigError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"invalid config {path}: {e}") from e


def _yaml(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)  # plain data only: no tags that build objects
    except yaml.YAMLError as e:
        raise ValueError(str(e)) from e


def infer_config(sd: dict[str, torch.Tensor], heads: int | None = None) -> Any:
    """Rebuild the configuration from tensor shapes, in the family the keys say; `heads` overrides
    the preset-table lookup (heads leave no trace in the weights)."""
    try:
        return registry.family_of_state_dict(sd).infer_config(sd, heads)
    except ValueError as e:
        raise CheckpointError(str(e)) from e


# ----- loading -------------------------------------------------------------------------------------


def check_state_dict(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Raise one error naming every missing, unexpected and wrongly-shaped key."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [(k, tuple(sd[k].shape), tuple(own[k].shape)) for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise CheckpointMismatch(missing, unexpected, wrong)


def fingerprint(model: torch.nn.Module, cfg: Any) -> str:
    """sha256 over the canonical config and every tensor (name, dtype, shape, bytes)."""
    h = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode())
    for k, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{k}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _config_beside(folder: Path) -> Path | None:
    """The configuration in a weights folder: `config.json`, else the folder's one `.yaml` / `.yml`
    (a reference's training config, as One-D-Piece / TiTok publish them), else None."""
    cfg = folder / "config.json"
    if cfg.is_file():
        return cfg
    yamls = sorted(p for suffix in YAML_SUFFIXES for p in folder.glob(f"*{suffix}"))
    if len(yamls) > 1:
        raise CheckpointError(f"{folder} holds several yaml configs ({', '.join(p.name for p in yamls)}) and no "
                              "config.json: keep the one the weights were trained with")
    return yamls[0] if yamls else None


def _locate(path: Path) -> tuple[Path, Path | None]:
    """(weights file, its configuration file or None) for a file or a directory."""
    if path.is_dir():
        for name in ("model.safetensors", "checkpoint.pth", "pytorch_model.bin"):
            if (path / name).is_file():
                return path / name, _config_beside(path)
        weights = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.pth")) + sorted(path.glob("*.bin"))
        if not weights:
            raise CheckpointError(f"no .safetensors, .pth or .bin file in {path}")
        path = weights[0]
    return path, _config_beside(path.parent)


def build_model(cfg: Any, sd: dict[str, torch.Tensor] | None = None, seed: int = 0) -> Any:
    """A model of the configuration's family in eval mode: the given weights (strictly), or a seeded
    random initialisation."""
    family = registry.family_of_config(cfg)
    if sd is not None:
        try:
            family.check_weights(sd)
        except ConfigError as e:
            raise CheckpointError(str(e)) from e
    torch.manual_seed(seed)
    model = family.model(cfg)
    assert isinstance(model, nn.Module)
    if sd is not None:
        check_state_dict(model, sd)
        model.load_state_dict(sd, strict=True)
    return model.eval()


def load_model(path: str | Path, heads: int | None = None, config: Any = None) -> LoadedModel:
    weights, cfg_path = _locate(Path(path))
    sd = read_state_dict(weights)
    if config is None:
        config = read_config_file(cfg_path) if cfg_path is not None else infer_config(sd, heads)
    model = build_model(config, sd)
    return LoadedModel(model, config, fingerprint(model, config), str(weights), registry.family_of_config(config))


def load_preset(name: str, seed: int = 0) -> LoadedModel:
    """A preset with random weights (seeded): for tests and until a trained default exists."""
    try:
        family, cfg = registry.preset(name)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    model = build_model(cfg, seed=seed)
    return LoadedModel(model, cfg, fingerprint(model, cfg), f"preset:{name}:seed{seed}", family)


# ----- converting -----------------------------------------------------------------------------------


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export(model: Any, out_dir: str | Path, card: str | None = None) -> str:
    """Write a model as a servable folder: `model.safetensors` (its fingerprint in the metadata),
    our `config.json` and, when given, `MODEL_CARD.md`. Returns the fingerprint. `convert` and
    training's export both write through here; `load_model(out_dir)` reads it back."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fp = fingerprint(model, model.cfg)
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}  # no shared storage
    save_file(tensors, str(out / "model.safetensors"), metadata={"fingerprint": fp})
    family = registry.family_of_config(model.cfg)
    (out / "config.json").write_text(json.dumps({"family": family.name, **model.cfg.to_dict()}, indent=2) + "\n")
    if card is not None:
        (out / "MODEL_CARD.md").write_text(card)
    return fp


def convert(src: str | Path, out_dir: str | Path, heads: int | None = None) -> LoadedModel:
    """Write `model.safetensors`, `config.json` and `MODEL_CARD.md` for a checkpoint."""
    loaded = load_model(src, heads=heads)
    out = Path(out_dir)
    export(loaded.model, out)
    n_params = sum(t.numel() for t in loaded.model.state_dict().values())
    rows = [
        ("family", loaded.family.name),
        ("source", f"`{Path(loaded.source).name}` (sha256 `{_sha256_file(Path(loaded.source))}`)"),
        ("model.safetensors sha256", f"`{_sha256_file(out / 'model.safetensors')}`"),
        ("fingerprint (config + weights)", f"`{loaded.fingerprint}`"),
        ("parameters", f"{n_params:,}"),
        *loaded.family.card(loaded.config),
    ]
    (out / "MODEL_CARD.md").write_text(f"# {loaded.family.name.upper()} model\n\n| field | value |\n|---|---|\n"
                                       + "".join(f"| {k} | {v} |\n" for k, v in rows))
    return loaded
