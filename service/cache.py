"""Result cache: an image's *trajectory* (per probe: token ids, their positions where the family's
tokens carry them, and measured quality; ALIT's probes are its iterations).

A probe's outcome does not depend on the target that asked for it (ALIT's halting draws are seeded
by the image's content; a KARL pass is named by its budget and quality conditioning), so every
request for the same image, model and settings finds the probes computed so far, and it is a hit
whenever they answer its target by the engine's rule — whatever target created them.

Storage: Redis (redis-py asyncio, hiredis parser) when `ALIT_REDIS_URL` is set, else an in-process
LRU. Records are a compact binary format with a version byte, never pickle. When Redis fails, the
cache steps aside (requests are served uncached, errors counted) and retries with exponential
backoff; it comes back by itself when Redis does. The stores also keep the leases of cross-replica
single-flight (`service/flights.py`): Redis holds them; the in-process store has no one to share with.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import struct
import time
from collections.abc import Callable

import numpy as np
import torch

from .engine.records import IterationRecord, Selection
from .engine.targets import Limits, Target

log = logging.getLogger("alit.cache")
FORMAT_VERSION = 2
_HEAD = struct.Struct("<BBB")  # version, records, bytes per id
_REC_V1 = struct.Struct("<BBHff")  # iteration, flags (bit0: quality measured), tokens, l1, psnr
_REC = struct.Struct("<IBHff")  # probe key, flags (bit0: quality measured, bit1: positions follow the ids), ...


def cache_key(image: torch.Tensor, fingerprint: str, variant: str) -> str:
    """sha256 of the preprocessed pixels (as 8-bit), the model fingerprint and the settings that
    change its tokens (`Limits.variant`: ALIT's halting mode)."""
    pixels = image.detach().mul(255).round().to(torch.uint8).cpu().numpy().tobytes()
    h = hashlib.sha256(pixels)
    h.update(f"|{fingerprint}|{variant}".encode())
    return h.hexdigest()


class Trajectory:
    def __init__(self, records: dict[int, IterationRecord] | None = None):
        self.records: dict[int, IterationRecord] = dict(records or {})

    def __len__(self) -> int:
        return len(self.records)

    def merge(self, records) -> Trajectory:
        """Add probes; a measured record replaces an unmeasured one, never the reverse."""
        for r in records:
            old = self.records.get(r.iteration)
            if old is None or (old.l1 is None and r.l1 is not None):
                self.records[r.iteration] = r
        return self

    def lookup(self, target: Target, limits: Limits) -> Selection | None:
        """The answer the engine gives `target`, when the stored iterations determine it: the engine's
        own rule (`Target.select`) over what is stored; None sends the request to the engine."""
        return target.select(self.records, limits)

    # ----- binary format ---------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        recs = sorted(self.records.values(), key=lambda r: r.iteration)
        wide = any(int(r.token_ids.max(initial=0)) > 0xFFFF or
                   (r.positions is not None and int(r.positions.max(initial=0)) > 0xFFFF) for r in recs)
        dtype = np.dtype("<u4") if wide else np.dtype("<u2")
        parts = [_HEAD.pack(FORMAT_VERSION, len(recs), dtype.itemsize)]
        for r in recs:
            measured = r.l1 is not None
            flags = int(measured) | (2 if r.positions is not None else 0)
            parts.append(_REC.pack(r.iteration, flags, r.token_ids.shape[0],
                                   r.l1 if measured else 0.0, r.psnr if measured and r.psnr is not None else 0.0))
            parts.append(r.token_ids.astype(dtype).tobytes())
            if r.positions is not None:
                parts.append(r.positions.astype(dtype).tobytes())
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes) -> Trajectory:
        """Either format: version 2, or version 1 (ALIT only: one-byte iterations, no positions)."""
        version, n, width = _HEAD.unpack_from(data, 0)
        if version not in (1, FORMAT_VERSION):
            raise ValueError(f"unknown cache record version {version}")
        rec = _REC if version == FORMAT_VERSION else _REC_V1
        dtype = np.dtype("<u4") if width == 4 else np.dtype("<u2")
        off, recs = _HEAD.size, []
        for _ in range(n):
            it, flags, count, l1, psnr = rec.unpack_from(data, off)
            off += rec.size
            ids = np.frombuffer(data, dtype=dtype, count=count, offset=off).astype(np.int32)
            off += count * width
            pos = None
            if flags & 2:
                pos = np.frombuffer(data, dtype=dtype, count=count, offset=off).astype(np.int32)
                off += count * width
            measured = bool(flags & 1)
            recs.append(IterationRecord(it, ids, float(l1) if measured else None, float(psnr) if measured else None,
                                        pos))
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

    # leases (cross-process single-flight): one process, nothing to coordinate with
    async def acquire_lease(self, key: str, token: str, ttl_s: float) -> bool | None:
        return None

    async def renew_lease(self, key: str, token: str, ttl_s: float) -> None:
        return None

    async def release_lease(self, key: str, token: str) -> None:
        return None

    async def lease_held(self, key: str) -> bool | None:
        return None

    async def close(self) -> None:
        self._data.clear()


# Renew / release a lease only while it still holds our token (it may have expired and been taken).
_RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


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

    # ----- leases: cross-process single-flight (service/flights.py) -------------------------------
    # A lease is `PREFIX lease: KEY` = a random token, with a TTL. Results: True/False, or None when
    # Redis is unavailable (the caller then falls back to per-process single-flight).
    async def acquire_lease(self, key: str, token: str, ttl_s: float) -> bool | None:
        name = self.prefix + "lease:" + key
        out = await self._call(lambda: self._redis.set(name, token, px=int(ttl_s * 1000), nx=True))
        return bool(out) if self.available else None

    async def renew_lease(self, key: str, token: str, ttl_s: float) -> None:
        await self._call(self._redis.eval, _RENEW, 1, self.prefix + "lease:" + key, token, int(ttl_s * 1000))

    async def release_lease(self, key: str, token: str) -> None:
        await self._call(self._redis.eval, _RELEASE, 1, self.prefix + "lease:" + key, token)

    async def lease_held(self, key: str) -> bool | None:
        out = await self._call(self._redis.exists, self.prefix + "lease:" + key)
        return bool(out) if self.available else None

    async def close(self) -> None:
        await self._redis.aclose()


def make_cache(redis_url: str | None, **kw) -> MemoryCache | RedisCache:
    if redis_url:
        return RedisCache(redis_url, **{k: v for k, v in kw.items() if k in ("prefix", "ttl_s", "timeout_s")})
    return MemoryCache(kw.get("max_entries", 10_000))
