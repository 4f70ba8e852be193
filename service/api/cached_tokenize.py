"""The path of one image through the service: cache lookup, single-flight (in this process and
across replicas, service/flights.py), engine, cache merge."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import tracing
from ..cache import Trajectory, cache_key
from ..engine import EngineInterface, IterationRecord, Target
from ..flights import LocalFlights, ReplicaFlights

log = logging.getLogger("alit.pipeline")


@dataclass
class Outcome:
    record: IterationRecord  # the returned probe (ALIT: iteration)
    iterations: int
    target_met: bool
    cached: bool
    trajectory: list[IterationRecord]  # every probe of the target's ladder up to the answer, in order
    queue_s: float
    compute_s: float


class TokenizePipeline:
    def __init__(self, engine: EngineInterface, cache, variant: str, observer=None, lease_ttl_s: float = 10.0):
        self.engine = engine
        self.cache = cache
        self.fingerprint = engine.loaded.fingerprint
        self.variant = variant
        self.flights = LocalFlights()
        self.replicas = ReplicaFlights(cache, lease_ttl_s)
        self.observer = observer

    def key(self, image: torch.Tensor) -> str:
        """The image's cache key (model input pixels, model, halting settings)."""
        return cache_key(image, self.fingerprint, self.variant)

    def _event(self, kind: str) -> None:
        if self.observer is not None:
            self.observer.cache(kind)

    async def tokenize(self, image: torch.Tensor, target: Target, deadline: float | None,
                       progress: Callable[[IterationRecord], None] | None = None, tag: str | None = None,
                       key: str | None = None) -> Outcome:
        """`image`: the model input, or a coroutine function giving it (decoded only on a miss);
        `key`: the image's cache key when the caller computed it already (then required for the latter)."""
        key = key or self.key(image)
        limits = self.engine.limits
        with tracing.span("cache lookup", **{"alit.cache.backend": self.cache.backend}) as sp:
            stored = await self.cache.get(key)
            if sp is not None:
                sp.set_attribute("alit.cache.iterations_stored", len(stored) if stored is not None else 0)
        while True:
            hit = stored.lookup(target, limits) if stored is not None else None
            if hit is not None:
                self._event("hit")
                log.debug("cache hit: %d of %d stored iterations", hit.iterations, len(stored))
                return self._from_trajectory(stored, target, limits, hit, progress)
            leader = self.flights.leader(key)
            if leader is None:
                break
            stored = await leader  # the leader's trajectory (None if it failed); then look again
            if stored is None or stored.lookup(target, limits) is None:
                # the leader's run cannot answer this target: compute it without single-flight
                return await self._compute(key, image, target, deadline, progress, tag, lead=False)
        # this process leads for the key; another replica may already be computing it
        try:
            lease, stored = await self.replicas.lead_or_wait(
                key, lambda t: t.lookup(target, limits) is not None, deadline)
        except BaseException:
            self.flights.done(key, None)
            raise
        if stored is not None:
            self.flights.done(key, stored)
            self._event("hit")
            return self._from_trajectory(stored, target, limits, stored.lookup(target, limits), progress)
        return await self._compute(key, image, target, deadline, progress, tag, lead=True, lease=lease)

    async def _compute(self, key, image, target, deadline, progress, tag, lead: bool, lease=None) -> Outcome:
        if callable(image):  # decoded only now, on a miss
            try:
                image = await image()
            except BaseException:
                if lease is not None:
                    await lease.release()
                if lead:
                    self.flights.done(key, None)
                raise
        self._event("miss")
        log.debug("cache miss: computing (%s)", "leader" if lead else "not single-flight")
        trajectory = None
        try:
            r = await self._run_engine(image, target, deadline, progress, tag)
            records = r.trajectory or []  # asked for: every iteration run
            trajectory = Trajectory().merge(records)
            with tracing.span("cache merge", **{"alit.cache.iterations": len(records)}):
                await self.cache.merge(key, records)
        finally:
            if lease is not None:
                await lease.release()
            if lead:
                self.flights.done(key, trajectory)
        chosen = next(x for x in records if x.iteration == r.selected_iteration)
        return Outcome(chosen, r.iterations, r.target_met, False, records,
                       r.timings["queue_s"], r.timings["compute_s"])

    async def _run_engine(self, image, target, deadline, progress, tag):
        """engine.tokenize; with tracing on, inside an `engine` span with `queue wait` and `compute`
        children timed by the engine, compute carrying one event per iteration."""
        if not tracing.ENABLED:
            return await self.engine.tokenize(image, target, deadline=deadline, trajectory=True, progress=progress,
                                              tag=tag)
        seen: list[tuple[float, IterationRecord]] = []

        def record(rec: IterationRecord) -> None:
            seen.append((tracing.now(), rec))
            if progress is not None:
                progress(rec)

        with tracing.span("engine", **{"alit.target": target.kind}) as sp:
            r = await self.engine.tokenize(image, target, deadline=deadline, trajectory=True, progress=record, tag=tag)
            end = tracing.now()
            t = r.timings
            start = end - t.get("total_s", t["queue_s"] + t["compute_s"])
            admitted = start + t["queue_s"]
            sp.set_attributes({"alit.iterations": r.iterations, "alit.num_tokens": r.num_tokens,
                               "alit.target_met": r.target_met})
            tracing.past_span("queue wait", start, admitted)
            tracing.past_span("compute", admitted, end, events=[
                ("iteration", at, {"alit.iteration": rec.iteration, "alit.tokens": int(rec.token_ids.shape[0]),
                                   "alit.l1": rec.l1, "alit.psnr": rec.psnr}) for at, rec in seen],
                **{"alit.iterations": r.iterations})
        return r

    @staticmethod
    def _from_trajectory(traj: Trajectory, target: Target, limits, hit, progress) -> Outcome:
        records = target.walked(traj.records, limits, hit.iterations)
        if progress is not None:
            for rec in records:
                progress(rec)
        return Outcome(hit.record, hit.iterations, hit.target_met, True, records, 0.0, 0.0)

