"""The tokenizer families this package serves, and how a model specification finds its family.

One line per family in `FAMILIES` (vLLM's model registry is the model): its model file defines a
`Family` record (service/model/family.py). A family is recognised from a checkpoint by
* our `config.json`'s `family` field (what `export` writes),
* a reference fixture's `config.json`, by the constructor-arguments key it holds (`Family.reference_key`),
* or a state dict alone, by a key only that family's weights have (`Family.marker`).
Preset names are unique across families. Nothing outside `service/model/` needs to know which
family a model is: it uses the `Tokenizer` and `Limits` interface.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from . import alit, karl, titok
from .family import Family

FAMILIES: dict[str, Family] = {f.name: f for f in (
    alit.FAMILY,
    karl.FAMILY,
    titok.FAMILY,
)}
LEGACY_FAMILY = "alit"  # config.json files written before families existed name none


def family_named(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r} (known: {', '.join(FAMILIES)})") from None


def family_of_config_dict(d: dict[str, Any]) -> Family:
    """The family a config.json describes (ours: its `family` field; a reference fixture's: its
    constructor-arguments key)."""
    if "family" in d:
        return family_named(str(d["family"]))
    for f in FAMILIES.values():
        if f.reference_key in d:
            return f
    return FAMILIES[LEGACY_FAMILY]


def family_of_config(cfg: Any) -> Family:
    for f in FAMILIES.values():
        if isinstance(cfg, f.config):
            return f
    raise TypeError(f"{type(cfg).__name__} is no registered family's configuration")


def family_of_state_dict(sd: dict[str, torch.Tensor]) -> Family:
    for f in FAMILIES.values():
        if f.marker in sd:
            return f
    markers = ", ".join(f"{f.marker!r} ({f.name})" for f in FAMILIES.values())
    raise ValueError(f"the weights belong to no known tokenizer family: none of the keys {markers} is present")


def family_of_fixture(fixture: Path) -> Family:
    """The family of a golden fixture folder (its config.json)."""
    path = Path(fixture) / "config.json"
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FileNotFoundError(f"cannot read {path}: {e}") from e
    return family_of_config_dict(d)


def preset(name: str) -> tuple[Family, Any]:
    """(family, validated config) of a preset name, whatever its family."""
    for f in FAMILIES.values():
        if name in f.presets:
            return f, f.presets[name].validate()
    known = sorted(n for f in FAMILIES.values() for n in f.presets)
    raise ValueError(f"unknown preset {name!r}; known: {', '.join(known)}")


def preset_name_of(cfg: Any) -> str | None:
    for f in FAMILIES.values():
        for name, p in f.presets.items():
            if p == cfg:
                return name
    return None


def resolve(spec: str, heads: int | None = None):
    """A model specification (`preset:NAME[:seedN]` or a path) -> a loaded model (checkpoint.LoadedModel)."""
    from .checkpoint import load_model, load_preset

    if spec.startswith("preset:"):
        parts = spec.split(":")
        seed = int(parts[2].removeprefix("seed")) if len(parts) > 2 else 0
        return load_preset(parts[1], seed=seed)
    return load_model(spec, heads=heads)
