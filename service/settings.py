"""Service settings: every knob is an `ALIT_*` environment variable with a documented default.

The README's configuration table lists the same fields; `tests/test_api.py` checks they agree.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .engine import EngineSettings
from .engine.policies import refill_setting
from .model.compile import CompileScope, compile_scope
from .model.config import BatchMode


def shipped_weights() -> Path:
    """The trained default model (service/weights/, see its MODEL_CARD.md). It is package data, so a
    checkout, an editable install and a wheel all find it here; random weights only come from an
    explicit `ALIT_MODEL=preset:...`, and a missing folder stops start-up (api/server.py: model_problem)."""
    return Path(__file__).resolve().parent / "weights"


SHIPPED_WEIGHTS = shipped_weights()
MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
DEFAULT_MODEL = str(SHIPPED_WEIGHTS)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ALIT_", extra="ignore")

    # model
    model: str = Field(DEFAULT_MODEL,
                       description="Weights: a .pth/.safetensors file, a directory holding one, or "
                                   "`preset:NAME[:seedN]`; default: the packaged `service/weights/`.")
    models: str = Field("", description="Several models in one process: `ID=SPEC,ID=SPEC` (each SPEC as for "
                                        "`ALIT_MODEL`; the first is the default for requests naming no `model`). "
                                        "Empty: the one model of `ALIT_MODEL`.")
    heads: int | None = Field(None, description="Attention heads when they cannot be inferred from the weights.")
    retry_stricter: bool = Field(False, description="Families conditioned on the quality wanted (KARL): when the "
                                                    "measured quality misses the target, run again at the next "
                                                    "stricter conditioning, down to the strictest (more passes, "
                                                    "`target_met` more often). Off: one pass, as the reference.")
    # engine
    engine: str = Field("local", pattern="^(local|triton)$",
                        description="`local`: in-process workers; `triton`: forward tokenization to Triton.")
    triton_url: str = Field("127.0.0.1:8011", description="Triton gRPC address when `ALIT_ENGINE=triton`.")
    devices: str = Field("auto",
                         description="`auto` (every GPU, else CPU), `cpu`, or `cuda:0,cuda:1`: one worker each.")
    max_batch: int = Field(32, ge=1, description="Images iterating per worker (continuous batching); up to as many "
                                                 "more may wait encoded for a slot.")
    max_queue: int = Field(256, ge=1,
                           description="Images waiting for admission; beyond it requests get 503 + Retry-After.")
    scheduling: Literal["continuous", "lockstep", "reference"] = Field(
        "continuous", description="`continuous` (images join and leave at every iteration); `lockstep` (a batch runs "
                                  "until its last image is done) and `reference` (one image at a time) are the "
                                  "benchmark baselines, to compare the whole service under each.")
    batch_mode: BatchMode = Field(
        "packed", description="Mixed iterations: packed tokens (attention per image), same-length cohorts, one "
                              "padded call, or `varlen`: packed with attention in one variable-length flash call "
                              "(CUDA, float16/bfloat16 only).")
    refill_at: float | Literal["auto"] = Field(
        "auto", description="Saturated (a full batch or more waiting): admit new images only once the running ones "
                            "are down to this fraction of the batch, as one cohort; 1 = fill every free slot at "
                            "once; auto = 0.25 on a CPU, 1 on a GPU.")
    admission: Literal["auto", "max_batch", "measured"] = Field(
        "auto", description="Images in flight per worker while less than a full batch waits: up to `max_batch`, or "
                            "up to the knee of the step-cost curve measured at warm-up; auto = measured on a CPU, "
                            "max_batch on a GPU.")
    compile: CompileScope = Field(
        "off", description="`torch.compile` (dynamic shapes, compiled during warm-up): `off`; `vqgan` (the VQGAN "
                           "convolution stacks only); `all` (those and the transformer blocks' per-token parts). "
                           "`true` = `all`, `false` = `off`, as before the scope existed; measured in "
                           "docs/benchmarks.md.")
    channels_last: bool = Field(False, description="Run the VQGAN convolution stacks in channels-last (NHWC) memory "
                                                   "format (their outputs come back in the usual layout); the same "
                                                   "outputs, faster cuDNN convolutions in bfloat16 on a GPU.")
    cuda_graphs: bool = Field(False, description="Run the VQGAN convolution stacks as CUDA graphs, one per batch "
                                                 "bucket (powers of two up to `ALIT_MAX_BATCH`; a call is padded up "
                                                 "to its bucket), captured at start-up. CUDA devices only: with a "
                                                 "CPU worker start-up stops with an error.")
    halting: bool = Field(True, description="2D-token dynamic halting during encoding, as the published model runs.")
    dtype: str = Field("float32", pattern="^(float32|bfloat16|float16)$",
                       description="Compute precision (autocast) on the workers.")
    torch_threads: int | None = Field(None, description="torch intra-op CPU threads (default: torch's choice).")
    warmup: bool = Field(True, description="Run one image through every worker before reporting ready.")
    default_max_l1: float = Field(0.07, gt=0, le=1,
                                  description="Target when a request names none (the reference default).")
    # requests
    request_timeout_s: float = Field(30.0, gt=0,
                                     description="Default deadline; a client may shorten it with `X-Request-Timeout`.")
    max_batch_images: int = Field(16, ge=1,
                                  description="Images per JSON tokenize request, sequences per reconstruct request.")
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1, description="Largest encoded image accepted.")
    max_image_pixels: int = Field(40_000_000, ge=1,
                                  description="Largest decoded image (width x height), checked before decoding.")
    decode_scale: float = Field(4.0, ge=0, description="Decode images at no fewer pixels than this multiple of the "
                                "model's input side (JPEG DCT scaling, else a box reduce), then the reference resize + "
                                "crop; 0 = decode every pixel.")
    decode_memory_mb: int = Field(256, ge=1, description="Decoded-pixel memory all requests may hold at once; images "
                                  "wait beyond it (one larger image decodes alone).")
    input_memo_entries: int = Field(4096, ge=0, description="Uploads remembered by digest, so the same bytes sent "
                                    "again skip decoding on a cache hit; 0 = off.")
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1, description="Largest request body.")
    # cache
    redis_url: str | None = Field(None, description="Redis URL for the result cache; unset = in-process LRU.")
    cache_prefix: str = Field("alit:v1:", description="Key prefix in Redis.")
    cache_ttl_s: int = Field(7 * 86400, ge=1, description="Lifetime of a cached trajectory in Redis.")
    cache_max_entries: int = Field(10_000, ge=1, description="Entries of the in-process LRU (no Redis).")
    cache_lease_s: float = Field(10.0, gt=0,
                                 description="TTL of the Redis lease a replica holds (and renews) while it computes a "
                                             "miss; others wait for its result, or take over once it expires.")
    # security and lifecycle
    api_keys: SecretStr = Field(SecretStr(""), description="Comma-separated API keys; empty (and no key file) = no "
                                                             "authentication.")
    api_keys_file: str | None = Field(None, description="A file of API keys, one `NAME KEY` per line; re-read when it "
                                                        "changes (rotation without restart).")
    rate_limit: float | None = Field(None, gt=0, description="Requests per second allowed per API key (token "
                                                             "bucket); unset = no limit.")
    rate_burst: int = Field(20, ge=1, description="Requests a key may send at once before the rate limit applies.")
    cors_origins: str = Field("", description="Comma-separated origins allowed by CORS; empty = CORS off.")
    drain_seconds: float = Field(30.0, ge=0, description="On SIGTERM, time given to in-flight and queued requests.")
    demo_page: bool = Field(True, description="Serve the demo page at `/`.")
    fault_injection: bool = Field(False,
                                  description="Tests only: a request with `X-Alit-Fault: step` makes its inference "
                                              "step raise.")
    log_format: str = Field("text", pattern="^(text|json)$",
                            description="`text` or `json` (one JSON object per line), for the service's and uvicorn's "
                                        "logs.")
    log_level: str = Field("INFO", pattern="(?i)^(debug|info|warning|error|critical)$", description="Log level.")
    access_log: bool = Field(True, description="One log line per request: method, path, status, duration, request id.")
    host: str = Field("127.0.0.1", description="Address `alit-serve serve` binds.")
    port: int = Field(8000, description="Port `alit-serve serve` binds.")

    @field_validator("refill_at", mode="before")
    @classmethod
    def _refill_at(cls, value: Any) -> float | str:
        return refill_setting(value)  # the one rule (engine/policies.py)

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_scope(cls, value: Any) -> CompileScope:
        return compile_scope(value)  # the one rule (model/compile.py); a ValueError is a validation error

    def model_specs(self) -> list[tuple[str | None, str]]:
        """(id, spec) of every model to serve, the default first; id None: named after its weights."""
        if not self.models.strip():
            return [(None, self.model)]
        out: list[tuple[str | None, str]] = []
        for part in self.models.split(","):
            name, eq, spec = part.strip().partition("=")
            if not eq or not MODEL_ID.fullmatch(name.strip()) or not spec.strip():
                raise ValueError(f"ALIT_MODELS: {part.strip()!r} is not ID=SPEC (ID of letters, digits, '.', '_', "
                                 "'-'; SPEC a weights path or preset:NAME)")
            if name.strip() in {n for n, _ in out}:
                raise ValueError(f"ALIT_MODELS: the id {name.strip()!r} is given twice")
            out.append((name.strip(), spec.strip()))
        return out

    def key_list(self) -> list[str]:
        return [k.strip() for k in self.api_keys.get_secret_value().split(",") if k.strip()]


def model_id(loaded: Any) -> str:
    """The id of a model `ALIT_MODELS` names none for (the API's single model, a bulk run's model): the
    shipped default, a preset's name, or the weights' file / folder name."""
    from .model.registry import preset_name_of

    source = Path(loaded.source)
    if source.parent == SHIPPED_WEIGHTS:
        return "alit-serve-default"
    if loaded.source.startswith("preset:") or preset_name_of(loaded.config):
        return preset_name_of(loaded.config) or loaded.source.split(":")[1]
    return source.parent.name if source.name == "model.safetensors" else source.stem


def engine_settings(settings: Settings, devices: str | None = None) -> EngineSettings:
    """The engine's part of the settings (the API and the Triton model build their engines from it);
    `devices` replaces `settings.devices` (Triton assigns each model instance its device)."""
    return EngineSettings(
        devices=settings.devices if devices is None else devices, max_batch=settings.max_batch,
        max_queue=settings.max_queue, policy=settings.scheduling, batch_mode=settings.batch_mode,
        halting=settings.halting, dtype=settings.dtype,
        warmup=settings.warmup, admission=settings.admission, compile=settings.compile, refill_at=settings.refill_at,
        channels_last=settings.channels_last, cuda_graphs=settings.cuda_graphs,
    )


def settings_with(overrides: dict[str, str]) -> Settings:
    """Settings from the environment and defaults, with `overrides` (by field name; empty strings
    ignored) on top: how the Triton model applies its config.pbtxt parameters. A name that is no
    setting raises ValueError, as does an invalid value (pydantic's ValidationError)."""
    unknown = sorted(set(overrides) - set(Settings.model_fields))
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: not a setting (known: {', '.join(Settings.model_fields)})")
    given: dict[str, Any] = {k: v for k, v in overrides.items() if v != ""}
    return Settings(**given)
