"""Result cache: an image's *trajectory* (per iteration: token ids and measured quality).

Because an image's recurrence does not depend on its target (halting draws are seeded by its
content), every request for the same image, model and halting settings walks the same trajectory
and only stops at a different point. So the cache stores what has been computed so far, and a
request is a hit whenever the stored iterations answer its target — whatever target created them.

Storage: Redis (redis-py asyncio, hiredis parser) when `ALIT_REDIS_URL` is set, else an in-process
LRU. Records are a compact binary format with a version byte, never pickle. When Redis fails, the
cache steps aside (requests are served uncached, errors counted) and retries with exponential
backoff; it comes back by itself when Redis does.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import struct
import time
from collections.abc import Callable

import numpy as np
import torch

from .engine.records import IterationRecord, Selection
from .engine.targets import ModelLimits, Target

log = logging.getLogger("alit.cache")
FORMAT_VERSION = 1
_HEAD = struct.Struct("<BBB")  # version, records, bytes per id
_REC = struct.Struct("<BBHff")  # iteration, flags (bit0: quality measured), tokens, l1, psnr


def cache_key(image: torch.Tensor, fingerprint: str, halting: str) -> str:
    """sha256 of the preprocessed pixels (as 8-bit), the model fingerprint and the halting mode."""
    pixels = image.detach().mul(255).round().to(torch.uint8).cpu().numpy().tobytes()
    h = hashlib.sha256(pixels)
    h.update(f"|{fingerprint}|{halting}".encode())
    return h.hexdigest()


class Trajectory:
    def __init__(self, records: dict[int, IterationRecord] | None = None):
        self.records: dict[int, IterationRecord] = dict(records or {})

    def __len__(self) -> int:
        return len(self.records)

    def merge(self, records) -> Trajectory:
        """Add iterations; a measured record replaces an unmeasured one, never the reverse."""
        for r in records:
            old = self.records.get(r.iteration)
            if old is None or (old.l1 is None and r.l1 is not None):
                self.records[r.iteration] = r
        return self

    def lookup(self, target: Target, limits: ModelLimits) -> Selection | None:
        """The answer the engine gives `target`, when the stored iterations determine it: the engine's
        own rule (`Target.select`) over what is stored; None sends the request to the engine."""
        return target.select(self.records, limits)

    # ----- binary format ---------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        recs = sorted(self.records.values(), key=lambda r: r.iteration)
        wide = any(int(r.token_ids.max(initial=0)) > 0xFFFF for r in recs)
        dtype = np.dtype("<u4") if wide else np.dtype("<u2")
        parts = [_HEAD.pack(FORMAT_VERSION, len(recs), dtype.itemsize)]
        for r in recs:
            measured = r.l1 is not None
            parts.append(_REC.pack(r.iteration, int(measured), r.token_ids.shape[0],
                                   r.l1 if measured else 0.0, r.psnr if measured and r.psnr is not None else 0.0))
            parts.append(r.token_ids.astype(dtype).tobytes())
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes) -> Trajectory:
        version, n, width = _HEAD.unpack_from(data, 0)
        if version != FORMAT_VERSION:
            raise ValueError(f"unknown cache record version {version}")
        dtype = np.dtype("<u4") if width == 4 else np.dtype("<u2")
        off, recs = _HEAD.size, []
        for _ in range(n):
            it, flags, count, l1, psnr = _REC.unpack_from(data, off)
            off += _REC.size
            ids = np.frombuffer(data, dtype=dtype, count=count, offset=off).astype(np.int32)
            off += count * width
            measured = bool(flags & 1)
            recs.append(IterationRecord(it, ids, float(l1) if measured else None, float(psnr) if measured else None))
        return cls().merge(recs)


# ----- stores ---------------------------------------------------------------------------------------


class MemoryCache:
    """In-process LRU of serialised trajectories (the same bytes Redis would hold)."""

    backend = "memory"

    def __init__(self, max_entries: int = 10_000):
        self.max_entries = max_entries
        self._data: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self.available = True
        self.on_error: Callable[[], None] | None = None  # never called: memory does not fail

    async def get(self, key: str) -> Trajectory | None:
        raw = self._data.get(key)
        if raw is None:
            return None
        self._data.move_to_end(key)
        return Trajectory.from_bytes(raw)

    async def merge(self, key: str, records: list[IterationRecord]) -> None:
        current = await self.get(key) or Trajectory()
        self._data[key] = current.merge(records).to_bytes()
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    async def close(self) -> None:
        self._data.clear()


class RedisCache:
    """Redis store with a circuit breaker: on failure, bypass and retry after a growing backoff."""

    backend = "redis"

    def __init__(self, url: str, prefix: str = "alit:v1:", ttl_s: int = 7 * 86400,
                 timeout_s: float = 0.25, max_backoff_s: float = 30.0):
        import redis.asyncio as redis

        self._redis = redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                     retry_on_timeout=False)
        self.prefix, self.ttl_s, self.max_backoff_s = prefix, ttl_s, max_backoff_s
        self.available = True
        self.on_error: Callable[[], None] | None = None  # counts failures, e.g. a Prometheus counter's inc
        self._retry_at = 0.0
        self._backoff = 0.0

    async def _call(self, op, *args):
        """Run a Redis command; None (and a counted error) when Redis is down or backing off."""
        if time.monotonic() < self._retry_at:
            return None
        try:
            out = await op(*args)
        except Exception as e:  # connection refused, timeout, protocol error: all bypass the cache
            self._error()
            self._backoff = min(self.max_backoff_s, max(0.25, self._backoff * 2))
            self._retry_at = time.monotonic() + self._backoff
            if self.available:
                log.warning("redis unavailable (%s: %s); serving uncached, retrying in %.2fs", type(e).__name__, e,
                            self._backoff)
            self.available = False
            return None
        if not self.available:
            log.info("redis is back")
        self.available, self._backoff = True, 0.0
        return out

    def _error(self) -> None:
        if self.on_error is not None:
            self.on_error()

    async def get(self, key: str) -> Trajectory | None:
        raw = await self._call(self._redis.get, self.prefix + key)
        if raw is None:
            return None
        try:
            return Trajectory.from_bytes(raw)
        except (ValueError, struct.error):
            self._error()
            return None

    async def merge(self, key: str, records: list[IterationRecord]) -> None:
        current = await self.get(key) or Trajectory()
        await self._call(self._redis.set, self.prefix + key, current.merge(records).to_bytes(), self.ttl_s)

    async def ping(self) -> bool:
        return bool(await self._call(self._redis.ping))

    async def close(self) -> None:
        await self._redis.aclose()


class SingleFlight:
    """Concurrent identical misses compute once: followers await the leader's outcome."""

    def __init__(self):
        self._inflight: dict[str, asyncio.Future] = {}

    def leader(self, key: str) -> asyncio.Future | None:
        """None if the caller leads (and must call `done`); else the leader's future to await,
        which yields the leader's result (None if it failed)."""
        fut = self._inflight.get(key)
        if fut is not None:
            return fut
        self._inflight[key] = asyncio.get_running_loop().create_future()
        return None

    def done(self, key: str, result=None) -> None:
        fut = self._inflight.pop(key, None)
        if fut is not None and not fut.done():
            fut.set_result(result)


def make_cache(redis_url: str | None, **kw) -> MemoryCache | RedisCache:
    if redis_url:
        return RedisCache(redis_url, **{k: v for k, v in kw.items() if k in ("prefix", "ttl_s", "timeout_s")})
    return MemoryCache(kw.get("max_entries", 10_000))
