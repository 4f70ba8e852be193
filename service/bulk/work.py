"""Per image: the API's bytes -> pixels path, then the in-process engine; shared by the local run
and every Ray actor, so a row is the same wherever it was computed.

`Plan` is what decides a row (model, target, decoding, halting): the driver builds it once, checks
it against a resumed run's manifest, and ships it to Ray actors, which load the same model and
refuse to work when its fingerprint differs.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from ..cache import cache_key
from ..engine import Engine, EngineSettings, StepFailed, Target
from ..imaging import ImageError, ImageLimits, decode_side, load_for_model
from ..model.checkpoint import LoadedModel
from ..model.registry import resolve
from .rows import error_row, result_row, target_json
from .sources import Record, read_error

log = logging.getLogger("alit.bulk")


@dataclass(frozen=True)
class Plan:
    """Everything a row depends on, and how the engine runs (plain data: JSON and Ray ship it)."""

    model_spec: str
    model_id: str
    family: str
    fingerprint: str
    target: dict[str, Any]
    decode_scale: float
    max_image_bytes: int
    max_image_pixels: int
    halting: bool
    retry_stricter: bool
    heads: int | None = None
    engine: dict[str, Any] = field(default_factory=dict)  # EngineSettings fields but devices

    def identity(self) -> dict[str, Any]:
        """What must be equal for two runs to write the same rows (a resume checks it)."""
        return {"fingerprint": self.fingerprint, "target": self.target, "decode_scale": self.decode_scale,
                "halting": self.halting, "retry_stricter": self.retry_stricter,
                "max_image_bytes": self.max_image_bytes, "max_image_pixels": self.max_image_pixels}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def base(self) -> dict[str, Any]:
        """The columns every row of this run shares."""
        return {"model": self.model_id, "fingerprint": self.fingerprint, "target": target_json(self.target)}


def load_model(plan: Plan) -> LoadedModel:
    """The plan's model, as the service loads it; ValueError if the weights found are other ones."""
    loaded = resolve(plan.model_spec, heads=plan.heads)
    if loaded.fingerprint != plan.fingerprint:
        raise ValueError(f"{plan.model_spec} holds other weights here (fingerprint {loaded.fingerprint[:16]}, "
                         f"expected {plan.fingerprint[:16]}): every node must see the same model")
    loaded.model.retry_stricter = plan.retry_stricter  # conditioned families; the rest ignore it
    return loaded


class ImageTokenizer:
    """Records -> rows on one in-process engine (workers on `devices`), decoding in `decode_threads`
    threads. `cache`: a trajectory cache (service/cache.py) to put every result into, or None."""

    def __init__(self, loaded: LoadedModel, plan: Plan, devices: str, decode_threads: int, cache=None):
        self.plan = plan
        limits = loaded.limits
        self.size, self.resample = limits.img_size, limits.resample
        self.min_side = decode_side(limits.img_size, plan.decode_scale)
        self.image_limits = ImageLimits(max_bytes=plan.max_image_bytes, max_pixels=plan.max_image_pixels)
        self.target = Target(**plan.target)
        self.engine = Engine(loaded, EngineSettings(devices=devices, **plan.engine)).start()
        self.pool = ThreadPoolExecutor(max(1, decode_threads), thread_name_prefix="alit-bulk-decode")
        self.cache = cache
        self.variant = limits.variant(plan.halting)
        self.cached = 0  # results handed to the cache
        self.cache_errors = 0  # cache operations that failed (the cache steps aside while Redis is down)
        if cache is not None:
            cache.on_error = self._cache_error

    def _cache_error(self) -> None:
        self.cache_errors += 1

    @property
    def workers(self) -> int:
        return len(self.engine.workers)

    def pixels(self, rec: Record):
        """The model input of a record, exactly as `POST /v1/tokenize` makes it (ImageError, OSError)."""
        return load_for_model(rec.read(), self.size, self.image_limits, self.resample, self.min_side)

    async def row(self, rec: Record) -> dict[str, Any]:
        """The record's row. An image that cannot be used is a row with its error; a failing engine
        (stopped, every worker dead) raises, since no later image could be tokenized either."""
        base = self.plan.base
        assert rec.key is not None
        if rec.error is not None:
            return error_row(base, rec.source, rec.key, rec.error_code or "unreadable", rec.error)
        try:
            pixels = await asyncio.get_running_loop().run_in_executor(self.pool, self.pixels, rec)
        except ImageError as e:
            return error_row(base, rec.source, rec.key, e.code, e.message)
        except OSError as e:
            return error_row(base, rec.source, rec.key, "unreadable", read_error(rec.path, e))
        try:
            r = await self.engine.tokenize(pixels, self.target, trajectory=self.cache is not None)
        except StepFailed as e:  # this image made the model raise (the API's 500 inference_failed)
            return error_row(base, rec.source, rec.key, "inference_failed", str(e))
        if self.cache is not None and r.trajectory:
            await self.cache.merge(cache_key(pixels, self.plan.fingerprint, self.variant), r.trajectory)
            self.cached += 1
        return result_row(base, rec.source, rec.key, r)

    def close(self) -> None:
        self.engine.shutdown()
        self.pool.shutdown(wait=False, cancel_futures=True)
