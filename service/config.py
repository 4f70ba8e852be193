"""Service settings: every knob is an `ALIT_*` environment variable with a documented default."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = "preset:test_tiny"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ALIT_", extra="ignore")

    model: str = Field(
        DEFAULT_MODEL,
        description="Weights to serve: a .pth / .safetensors file, a directory holding one, "
        "or `preset:NAME` for a preset with seeded random weights.",
    )
    heads: int | None = Field(None, description="Attention heads when they cannot be inferred from the weights.")
    host: str = Field("127.0.0.1", description="Address `alit-serve serve` binds.")
    port: int = Field(8000, description="Port `alit-serve serve` binds.")
    torch_threads: int | None = Field(None, description="torch intra-op threads (default: torch's choice).")
