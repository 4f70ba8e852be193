"""The path of one image through the service: cache lookup, single-flight (in this process and
across replicas, service/flights.py), engine, cache merge."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..cache import Trajectory, cache_key
from ..engine import EngineInterface, IterationRecord, Target
from ..flights import LocalFlights, ReplicaFlights


@dataclass
class Outcome:
    record: IterationRecord  # the returned iteration
    iterations: int
    target_met: bool
    cached: bool
    trajectory: list[IterationRecord]  # every iteration up to the answer, in order
    queue_s: float
    compute_s: float


class TokenizePipeline:
    def __init__(self, engine: EngineInterface, cache, halting_tag: str, observer=None, lease_ttl_s: float = 10.0):
        self.engine = engine
        self.cache = cache
        self.fingerprint = engine.loaded.fingerprint
        self.halting_tag = halting_tag
        self.flights = LocalFlights()
        self.replicas = ReplicaFlights(cache, lease_ttl_s)
        self.observer = observer

    def _event(self, kind: str) -> None:
        if self.observer is not None:
            self.observer.cache(kind)

    async def tokenize(self, image: torch.Tensor, target: Target, deadline: float | None,
                       progress: Callable[[IterationRecord], None] | None = None, tag: str | None = None) -> Outcome:
        key = cache_key(image, self.fingerprint, self.halting_tag)
        limits = self.engine.limits
        stored = await self.cache.get(key)
        while True:
            hit = stored.lookup(target, limits) if stored is not None else None
            if hit is not None:
                self._event("hit")
                return self._from_trajectory(stored, hit, progress)
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
            return self._from_trajectory(stored, stored.lookup(target, limits), progress)
        return await self._compute(key, image, target, deadline, progress, tag, lead=True, lease=lease)

    async def _compute(self, key, image, target, deadline, progress, tag, lead: bool, lease=None) -> Outcome:
        self._event("miss")
        trajectory = None
        try:
            r = await self.engine.tokenize(image, target, deadline=deadline, trajectory=True, progress=progress,
                                           tag=tag)
            records = r.trajectory or []  # asked for: every iteration run
            trajectory = Trajectory().merge(records)
            await self.cache.merge(key, records)
        finally:
            if lease is not None:
                await lease.release()
            if lead:
                self.flights.done(key, trajectory)
        chosen = next(x for x in records if x.iteration == r.selected_iteration)
        return Outcome(chosen, r.iterations, r.target_met, False, records,
                       r.timings["queue_s"], r.timings["compute_s"])

    @staticmethod
    def _from_trajectory(traj: Trajectory, hit, progress) -> Outcome:
        records = [traj.records[n] for n in sorted(traj.records) if n <= hit.iterations]
        if progress is not None:
            for rec in records:
                progress(rec)
        return Outcome(hit.record, hit.iterations, hit.target_met, True, records, 0.0, 0.0)

