"""Single-flight: concurrent identical cache misses compute once, in this process and across replicas.

In this process, the first request for a key leads and later ones await its future (`LocalFlights`).
Across processes, the leading request takes a lease in Redis (`PREFIX lease: KEY`, a random token
with a TTL) before computing and renews it while the engine runs; a leader of another replica that
finds the lease taken waits: it polls the cache until the trajectory answers its target, and
computes itself when the lease disappears without that (the holder finished with fewer iterations,
died, or stopped renewing so the lease expired) or its deadline passes. With Redis down (or no
Redis) leases are unavailable and single-flight is per process.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable

from .cache import Trajectory


class LocalFlights:
    """Within one process: followers await the leader's outcome."""

    def __init__(self):
        self._inflight: dict[str, asyncio.Future] = {}

    def leader(self, key: str) -> asyncio.Future | None:
        """None if the caller leads (and must call `done`); else the leader's future to await,
        which yields the leader's trajectory (None if it failed)."""
        fut = self._inflight.get(key)
        if fut is not None:
            return fut
        self._inflight[key] = asyncio.get_running_loop().create_future()
        return None

    def done(self, key: str, result: Trajectory | None = None) -> None:
        fut = self._inflight.pop(key, None)
        if fut is not None and not fut.done():
            fut.set_result(result)


class Lease:
    """A held lease: renewed every third of its TTL until released."""

    def __init__(self, cache, key: str, token: str, ttl_s: float):
        self.cache, self.key, self.token, self.ttl_s = cache, key, token, ttl_s
        self._renewer = asyncio.get_running_loop().create_task(self._renew())

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self.ttl_s / 3)
            await self.cache.renew_lease(self.key, self.token, self.ttl_s)

    async def release(self) -> None:
        """Called after the result is in the cache, so waiters find it before they see the lease gone."""
        self._renewer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._renewer
        await self.cache.release_lease(self.key, self.token)


class ReplicaFlights:
    """Across processes, through the cache's Redis leases."""

    def __init__(self, cache, lease_ttl_s: float = 10.0, poll_s: float = 0.05):
        self.cache, self.lease_ttl_s, self.poll_s = cache, lease_ttl_s, poll_s

    async def lead_or_wait(self, key: str, answers: Callable[[Trajectory], bool],
                           deadline: float | None) -> tuple[Lease | None, Trajectory | None]:
        """(lease, None): compute here (lease None when Redis is unavailable or the deadline came);
        (None, trajectory): another replica computed a trajectory that answers."""
        while True:
            token = uuid.uuid4().hex
            got = await self.cache.acquire_lease(key, token, self.lease_ttl_s)
            if got is not False:  # ours (True), or no Redis (None: per-process single-flight only)
                lease = Lease(self.cache, key, token, self.lease_ttl_s) if got else None
                # look once more: a leader (here or elsewhere) may have stored the answer since our
                # first lookup, between it and becoming leader
                stored = await self.cache.get(key)
                if stored is not None and answers(stored):
                    if lease is not None:
                        await lease.release()
                    return None, stored
                return lease, None
            while True:  # another replica holds the lease: wait for its result
                await asyncio.sleep(self.poll_s)
                stored = await self.cache.get(key)
                if stored is not None and answers(stored):
                    return None, stored
                if deadline is not None and time.monotonic() >= deadline:
                    return None, None
                held = await self.cache.lease_held(key)
                if not held:
                    break  # released without our answer, expired (holder died) or Redis gone: try again
