"""Deciding, one step at a time on one device: which images run, which are admitted, which retire.

Each `Scheduler.step` (run by one worker thread) does, in order:
1. drop running, encoded or newly taken jobs whose deadline passed or whose client went away;
2. encode the new jobs (one batched VQGAN encode, `ModelRunner.prepare`) into the `ready` list,
   and start as many ready images as the policy has free slots, oldest first;
3. advance every running image by one probe in ONE packed model call, whatever its probe (ALIT:
   its next iteration, 2D-token halting included when enabled; KARL: a single pass at the budget and
   quality conditioning its target's ladder names next, `Target.next_probe`);
4. measure quality only where a target needs it, in ONE pixel-decode call for the whole step, with
   the step's `/reconstruct` jobs riding along;
5. retire every image whose answer is determined (`Target.select`), resolving its future at once;
   the rest stay for the next step, where new images join them.
How many images a worker takes and starts is its `Policy`'s call (continuous, lockstep, reference;
continuous batching takes more than its free slots to encode ahead in large calls); executing the
model calls is the `ModelRunner`'s.
"""

from __future__ import annotations

import time

import torch

from ..model.family import StepOutput
from .errors import DeadlineExceeded, StepFailed
from .jobs import Job, ReconstructJob, TokenizeJob
from .observer import EngineObserver
from .policies import Policy
from .records import IterationRecord, TokenizeResult
from .runner import ItemFailed, ModelRunner
from .targets import Limits


class Scheduler:
    """`runner` executes (a `ModelRunner`, or the benchmark's simulated device); the scheduler only
    decides and keeps each image's records."""

    def __init__(self, runner: ModelRunner, policy: Policy, observer: EngineObserver, limits: Limits, *,
                 halting: bool = True):
        self.runner = runner
        self.device = runner.device
        self.policy = policy
        self.halting = halting
        self.observer = observer
        self.limits = limits
        self.active: list[TokenizeJob] = []  # iterating
        self.ready: list[TokenizeJob] = []  # encoded, waiting for a slot (oldest first)
        self.steps = 0
        self.step_time = 0.05  # EWMA of step wall time, seconds (for Retry-After estimates)
        self.pixel_decodes = 0

    def to_take(self, waiting: int = 0) -> int:
        """Jobs to take from the queue now, with `waiting` there (the policy's `to_take`; its
        `capacity` is free slots)."""
        return self.policy.to_take(len(self.active), len(self.ready), waiting)

    @property
    def holding(self) -> int:
        """Images this scheduler holds: iterating or encoded."""
        return len(self.active) + len(self.ready)

    # ----- one step ------------------------------------------------------------------------------------
    def step(self, new_jobs: list[Job], waiting: int = 0) -> None:
        """One step over the running images and `new_jobs`; `waiting`: images still in the queue."""
        t0 = time.perf_counter()
        now = time.monotonic()
        new_jobs = [j for j in new_jobs if self._still_wanted(j, now)]
        self.active = [j for j in self.active if self._still_wanted(j, now)]
        self.ready = [j for j in self.ready if self._still_wanted(j, now)]
        for j in new_jobs:
            j.admitted = now
            self.observer.queue_wait(now - j.submitted)
        tok_new = [j for j in new_jobs if isinstance(j, TokenizeJob)]
        rec_new = [j for j in new_jobs if isinstance(j, ReconstructJob)]
        in_step: list[Job] = [*self.active, *self.ready, *new_jobs]
        stepped = 0
        if not in_step:  # everything left was cancelled or expired
            self.observer.active(self.device, 0, 0)
            return
        try:
            with torch.inference_mode(), self.runner.precision():
                if tok_new:
                    self._admit(tok_new)
                start = self.policy.capacity(len(self.active), len(self.ready) + waiting)
                self.active += self.ready[:start]
                self.ready = self.ready[start:]
                stepped = len(self.active)
                self._iterate(list(self.active), rec_new)
        except Exception as e:  # not a model call (those fail per image): fail this step's images
            err = StepFailed(f"inference step failed on {self.device}: {type(e).__name__}: {e}")
            for j in in_step:
                if not j.future.done():
                    j.fail(err)
            self.active, self.ready = [], []
            self.observer.rejected("step_failed")
            raise
        finally:
            self.steps += 1
            self.observer.active(self.device, len(self.active), len(self.ready))
        elapsed = time.perf_counter() - t0
        self.step_time = 0.9 * self.step_time + 0.1 * elapsed
        self.observer.step(stepped + len(rec_new), elapsed, self.device)

    def _still_wanted(self, j: Job, now: float) -> bool:
        if j.cancelled or j.future.done():
            self.observer.rejected("cancelled")
            return False
        if j.expired(now):
            j.fail(DeadlineExceeded(
                f"deadline passed after {now - j.submitted:.2f} s "
                f"({'before compute started' if j.admitted is None else 'during compute'})"
            ))
            self.observer.rejected("deadline")
            return False
        return True

    def _ok(self, jobs: list, results: list) -> list[tuple]:
        """(job, result) for the jobs whose model call succeeded; the others fail here."""
        out = []
        for j, r in zip(jobs, results):
            if isinstance(r, ItemFailed):
                self._fail(j, r.error)
            else:
                out.append((j, r))
        return out

    def _fail(self, j: Job, e: BaseException) -> None:
        j.fail(StepFailed(f"inference failed for this image on {self.device}: {type(e).__name__}: {e}"))
        self.observer.rejected("step_failed")
        if isinstance(j, TokenizeJob):
            j.state = None
            self.active = [a for a in self.active if a is not j]
            self.ready = [a for a in self.ready if a is not j]

    def _admit(self, jobs: list[TokenizeJob]) -> None:
        t = time.monotonic()
        for j, s in self._ok(jobs, self.runner.prepare(jobs)):
            j.state = s
            j.compute_started = t
            self.ready.append(j)

    def _iterate(self, jobs: list[TokenizeJob], reconstruct: list[ReconstructJob]) -> None:
        probes = [j.target.next_probe(j.records, self.limits) for j in jobs]  # None never: a walked ladder retired
        stepped: list[tuple[TokenizeJob, StepOutput]] = (
            self._ok(jobs, self.runner.advance(jobs, probes, self.halting)) if jobs else [])  # type: ignore[arg-type]
        outs = {id(j): o for j, o in stepped}
        need = [j for j, _ in stepped if self.policy.measure_every_iteration or j.target.needs_quality]
        # logits for the pixel decode: the halting step decoded them already; else one decoder call
        undecoded_tok = [j for j in need if outs[id(j)].logits is None]
        seqs = [(outs[id(j)].token_ids, outs[id(j)].positions) for j in undecoded_tok]
        its = [j.running.iteration for j in undecoded_tok]
        undecoded: list[Job] = [*undecoded_tok, *reconstruct]
        seqs += [(j.token_ids, j.positions) for j in reconstruct]
        its += [0] * len(reconstruct)
        logits: dict[int, torch.Tensor] = {id(j): o.logits for j, o in stepped if o.logits is not None}
        if undecoded:
            for j, lg in self._ok(undecoded, self.runner.decode_logits(undecoded, seqs, its)):
                logits[id(j)] = lg
        to_decode: list[Job] = [j for j in [*need, *reconstruct] if id(j) in logits and not j.future.done()]
        measured: dict[int, tuple[float, float]] = {}
        if to_decode:
            its = [j.running.iteration if isinstance(j, TokenizeJob) else 0 for j in to_decode]
            for j, r in self._ok(to_decode, self.runner.pixels(to_decode, [logits[id(j)] for j in to_decode], its)):
                if isinstance(j, ReconstructJob):
                    j.resolve(r)
                else:
                    measured[id(j)] = r
                    j.pixel_decodes += 1
            self.pixel_decodes += len(measured)
        done = []
        for (j, o), ids, pos in zip(stepped, *self._to_cpu([o for _, o in stepped])):
            if j.future.done():  # its decode or measurement failed
                continue
            l1, psnr = measured.get(id(j), (None, None))
            if self._record(j, IterationRecord(o.probe, ids, l1, psnr, pos)):
                done.append(j)
        if done:
            finished = set(map(id, done))
            self.active = [j for j in self.active if id(j) not in finished]
            for j in done:
                self._retire(j)

    @staticmethod
    def _to_cpu(outs: list[StepOutput]) -> tuple[list, list]:
        """Every output's token ids (and positions, where it has them) as int32 numpy arrays, in one
        device-to-host copy."""
        if not outs:
            return [], []
        parts = [o.token_ids for o in outs] + [o.positions for o in outs if o.positions is not None]
        flat = torch.cat(parts).to("cpu", torch.int32).split([p.shape[0] for p in parts])
        ids, rest = [t.numpy() for t in flat[:len(outs)]], iter(flat[len(outs):])
        pos = [None if o.positions is None else next(rest).numpy() for o in outs]
        return ids, pos

    def _record(self, j: TokenizeJob, rec: IterationRecord) -> bool:
        """Store this probe's outcome; True when the image is done."""
        j.records[rec.iteration] = rec
        if j.progress is not None:
            j.progress(rec)
        if self.policy.runs_to_cap and j.target.next_probe(j.records, self.limits) is not None:
            return False
        return j.target.select(j.records, self.limits) is not None

    def _retire(self, j: TokenizeJob) -> None:
        chosen = j.target.select(j.records, self.limits)
        assert chosen is not None
        now = time.monotonic()
        result = TokenizeResult(
            token_ids=chosen.record.token_ids,
            positions=chosen.record.positions,
            iterations=j.running.iteration,
            selected_iteration=chosen.record.iteration,
            l1=chosen.record.l1,
            psnr=chosen.record.psnr,
            target_met=chosen.target_met,
            pixel_decodes=j.pixel_decodes,
            timings={
                "queue_s": (j.admitted or now) - j.submitted,
                "compute_s": now - (j.compute_started or now),
                "total_s": now - j.submitted,
            },
            trajectory=j.target.walked(j.records, self.limits, len(j.records)) if j.want_trajectory else None,
        )
        j.state = None  # free the sequence now
        self.observer.retired(j.target.kind, chosen.iterations, result.num_tokens, result.target_met)
        j.resolve(result)
