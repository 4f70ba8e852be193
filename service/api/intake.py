"""Image intake: request images -> model inputs, decoding only the pixels the model needs, with the
memory that decoding may hold at once bounded.

Each image's header is read first (limits checked, nothing decoded); JPEGs are set to decode at the
smallest DCT scale whose shorter side is still >= `ALIT_DECODE_SCALE` x the model's input side (other
formats are box-reduced after decoding), so a 12 MP photo becomes a few hundred pixels a side before
the reference resize + crop. The decoded size is then known, and the image waits until its bytes
fit in the decode budget (`ALIT_DECODE_MEMORY_MB`): concurrency follows memory, not cores (an image
larger than the whole budget decodes alone). When a burst is over, freed heap is handed back to the
OS (glibc `malloc_trim`), so the resident set falls back instead of staying at its peak.

Uploads are also remembered by digest (`ALIT_INPUT_MEMO_ENTRIES`, an LRU of SHA-256 of the bytes ->
the model input's cache key): a repeat of the same bytes looks the result cache up without decoding,
and decodes only when the cache cannot answer (evicted, or a target the stored iterations do not meet).
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import ctypes.util
import functools
import hashlib
import logging
from collections.abc import Callable
from typing import Any

import torch

from .. import tracing
from ..engine import Target, parse_target
from ..imaging import ImageLimits, decode_side, model_input, open_image, plan_decode

log = logging.getLogger("alit.intake")
WORKING_COPIES = 2  # the decoded image plus one working copy (mode conversion / orientation / reduce)
INLINE_BYTES = 128 * 128 * 4 * WORKING_COPIES  # images this small decode on the event loop (< 0.3 ms)
INLINE_HASH_BYTES = 256 * 1024  # uploads this small are hashed on the event loop (< 0.2 ms)
TRIM_AFTER_BYTES = 64 * 1024 * 1024  # a burst that reserved this much in total trims the heap when it ends


class DecodeBudget:
    """Bytes of decoded pixels in flight, at most `capacity` (one image larger than it runs alone)."""

    def __init__(self, capacity: int, gauge=None):
        self.capacity = capacity
        self.in_use = 0
        self.gauge = gauge
        self._cond = asyncio.Condition()
        self._since_trim = 0

    async def reserve(self, n: int) -> None:
        async with self._cond:
            await self._cond.wait_for(lambda: self.in_use == 0 or self.in_use + n <= self.capacity)
            self.in_use += n
            self._since_trim += n
            self._report()

    async def release(self, n: int) -> None:
        async with self._cond:
            self.in_use -= n
            self._report()
            self._cond.notify_all()
            trim = self.in_use == 0 and self._since_trim >= TRIM_AFTER_BYTES
            if trim:
                self._since_trim = 0
        if trim:
            await asyncio.to_thread(release_heap)

    def _report(self) -> None:
        if self.gauge is not None:
            self.gauge.set(self.in_use)


_libc: ctypes.CDLL | bool | None = None


def release_heap() -> None:
    """Hand freed heap pages back to the OS (glibc); a no-op elsewhere."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _libc = False
    if isinstance(_libc, ctypes.CDLL):
        _libc.malloc_trim(0)


class Intake:
    def __init__(self, limits: ImageLimits, img_size: int, decode_scale: float, budget: DecodeBudget,
                 keyer: Callable[[torch.Tensor], str] | None = None, memo_entries: int = 4096,
                 resample: str = "bicubic"):
        self.limits = limits
        self.resample = resample  # the model family's resize filter
        self.keyer = keyer  # the cache key of a model input, computed with the decode (off the event loop)
        self.img_size = img_size
        self.min_side = decode_side(img_size, decode_scale)
        self.budget = budget
        # digest of the uploaded bytes -> cache key of the model input they decoded to: the same bytes
        # sent again need no decoding unless the result cache cannot answer (see `prepare`)
        self.memo: collections.OrderedDict[bytes, str] = collections.OrderedDict()
        self.memo_entries = memo_entries if keyer is not None else 0

    async def image(self, data: bytes) -> tuple[torch.Tensor, str | None]:
        """Bytes -> (the model input (3, S, S), its cache key); ImageError for a bad image."""
        with tracing.span("image decode", **{"alit.image.bytes": len(data)}) as sp:
            img = open_image(data, self.limits)
            if sp is not None:
                sp.set_attributes({"alit.image.format": img.format, "alit.image.width": img.size[0],
                                   "alit.image.height": img.size[1]})
            cost = plan_decode(img, self.min_side) * WORKING_COPIES
            if sp is not None:
                sp.set_attributes({"alit.image.decoded_width": img.size[0], "alit.image.decoded_height": img.size[1]})
            if cost <= INLINE_BYTES:  # a thumbnail: decoding costs less than handing it to a thread
                return self._decode(img)
            await self.budget.reserve(cost)
            try:
                return await asyncio.to_thread(self._decode, img)
            finally:
                await self.budget.release(cost)

    def _decode(self, img) -> tuple[torch.Tensor, str | None]:
        pixels = model_input(img, self.img_size, self.min_side, self.resample)
        return pixels, (self.keyer(pixels) if self.keyer is not None else None)

    async def _digest(self, data: bytes) -> bytes:
        if len(data) <= INLINE_HASH_BYTES:
            return hashlib.sha256(data).digest()
        return await asyncio.to_thread(lambda: hashlib.sha256(data).digest())  # hashlib releases the GIL

    async def prepare(self, items: list[tuple[bytes, dict]], model_limits, default: Target) -> list[tuple]:
        """A request's (bytes, target spec) items -> (model input, Target, cache key), one after the other.

        Bytes seen before (same digest) are not decoded here: their model input is then a coroutine
        function that decodes them, which the pipeline calls only if the result cache cannot answer."""
        out: list[tuple[Any, Target, str | None]] = []
        for data, spec in items:
            target = parse_target(spec, model_limits, default)
            digest = await self._digest(data) if self.memo_entries else None
            known = self.memo.get(digest) if digest is not None else None
            if digest is not None and known is not None:
                self.memo.move_to_end(digest)
                out.append((functools.partial(self._pixels, data), target, known))
                continue
            pixels, key = await self.image(data)
            if digest is not None and key is not None:
                self.memo[digest] = key
                if len(self.memo) > self.memo_entries:
                    self.memo.popitem(last=False)
            out.append((pixels, target, key))
        return out

    async def _pixels(self, data: bytes) -> torch.Tensor:
        return (await self.image(data))[0]
