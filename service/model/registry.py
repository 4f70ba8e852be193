"""Resolve a model specification (`preset:NAME[:seedN]` or a path) to a loaded model."""

from __future__ import annotations

from .checkpoint import LoadedModel, load_model, load_preset


def resolve(spec: str, heads: int | None = None) -> LoadedModel:
    if spec.startswith("preset:"):
        parts = spec.split(":")
        seed = int(parts[2].removeprefix("seed")) if len(parts) > 2 else 0
        return load_preset(parts[1], seed=seed)
    return load_model(spec, heads=heads)
