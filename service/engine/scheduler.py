"""Iteration-level scheduling on one device: admit, advance one iteration, measure, retire.

Each `Scheduler.step` (run by one worker thread) does, in order:
1. drop active or newly admitted jobs whose deadline passed or whose client went away;
2. admit the new jobs: one batched VQGAN encode + initial sequence (`ALIT.prepare`);
3. run one recurrent iteration for every active image, grouped into same-iteration cohorts (or one
   padded call), 2D-token halting included when enabled;
4. measure quality only for images whose target needs it (a `tokens` target never decodes pixels);
5. retire every image whose target is met or whose iteration cap is reached, resolving its future
   at once; the rest stay active for the next step, where new images join them.
`/reconstruct` jobs ride along in the same step (token ids -> logits -> pixels).

The `policy` switches between this continuous batching and the two baselines the benchmark
compares it with: `lockstep` (admit only into an empty batch) and `reference` (one image at a time,
every iteration decoded to pixels, the target checked afterwards, as the reference `encode()`).
"""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Callable, Literal

import numpy as np
import torch

from ..model.alit import ALIT, ImageState, StepOutput, quality
from .errors import DeadlineExceeded, StepFailed
from .observer import EngineObserver
from .targets import ModelLimits, Target

Policy = Literal["continuous", "lockstep", "reference"]


@dataclass
class IterationRecord:
    """One iteration of one image: its tokens so far and, when measured, their quality."""

    iteration: int  # 1-based
    token_ids: np.ndarray  # int32, 32 * iteration
    l1: float | None = None
    psnr: float | None = None


@dataclass
class TokenizeResult:
    token_ids: np.ndarray
    iterations: int  # iterations run
    selected_iteration: int  # iteration whose tokens are returned
    l1: float | None
    psnr: float | None
    target_met: bool
    pixel_decodes: int
    timings: dict[str, float]
    trajectory: list[IterationRecord] | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])


# ----- jobs ------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Job:
    """One unit of work. Its thread-safe future is awaited from asyncio via `asyncio.wrap_future`
    (cancelling the awaiting task cancels it) or waited on directly (warm-up, Triton, benchmarks)."""

    deadline: float | None = None  # time.monotonic() seconds
    future: Future = field(default_factory=Future)
    submitted: float = field(default_factory=time.monotonic)
    admitted: float | None = None
    tag: str | None = None  # free-form label (fault-injection tests, tracing)
    # Asked once per step when set: False means the caller went away (Triton's request cancellation)
    # and the job is cancelled like an abandoned HTTP request.
    still_wanted: Callable[[], bool] | None = None

    @property
    def cancelled(self) -> bool:
        if self.still_wanted is not None and not self.future.done() and not self.still_wanted():
            self.future.cancel()
        return self.future.cancelled()

    def resolve(self, value) -> None:
        with contextlib.suppress(InvalidStateError):  # cancelled meanwhile
            self.future.set_result(value)

    def fail(self, exc: BaseException) -> None:
        with contextlib.suppress(InvalidStateError):
            self.future.set_exception(exc)

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now > self.deadline


@dataclass(eq=False)
class TokenizeJob(Job):
    image: torch.Tensor | None = None  # (3, H, W) in [0, 1]
    target: Target = field(default_factory=Target)
    want_trajectory: bool = False
    progress: Callable[[IterationRecord], None] | None = None  # called from the worker thread
    state: ImageState | None = None
    records: list[IterationRecord] = field(default_factory=list)
    best: IterationRecord | None = None
    first_met: IterationRecord | None = None
    pixel_decodes: int = 0
    compute_started: float | None = None


@dataclass(eq=False)
class ReconstructJob(Job):
    token_ids: torch.Tensor | None = None  # (n,) int64


# ----- the scheduler ----------------------------------------------------------------------------------


@dataclass
class SchedulerSettings:
    max_batch: int = 32
    policy: Policy = "continuous"
    batch_mode: Literal["cohort", "padded"] = "cohort"
    halting: bool = True  # 2D-token dynamic halting, as the published model runs
    dtype: str = "float32"


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


class ItemFailed:
    """In a `split_run` result list: this item's computation raised even when run on its own."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException):
        self.error = error


def split_run(fn: Callable[[list], list], items: list) -> list:
    """fn(items) -> one result per item. When it raises, the same on each half, recursively: a batch
    that runs out of memory is split until it fits, and an image that makes the model fail ends up
    alone, where its failure becomes an `ItemFailed` in its place, so its batch-mates still get
    their results. Safe because every model call commits no state unless it succeeds."""
    try:
        return fn(items)
    except Exception as e:
        if len(items) < 2:
            return [ItemFailed(e)]
        if _is_oom(e) and torch.cuda.is_available():
            torch.cuda.empty_cache()
        mid = len(items) // 2
        return split_run(fn, items[:mid]) + split_run(fn, items[mid:])


class Scheduler:
    def __init__(self, model: ALIT, device: str, settings: SchedulerSettings, observer: EngineObserver):
        self.model = model
        self.device = device
        self.settings = settings
        self.observer = observer
        self.limits = ModelLimits(model.cfg.tokens_per_iter, model.cfg.max_iters)
        self.active: list[TokenizeJob] = []
        self.fault_hook: Callable[[list[Job]], None] | None = None  # tests inject model-call failures
        self.steps = 0
        self.step_time = 0.05  # EWMA of step wall time, seconds (for Retry-After estimates)
        self.images_admitted = 0
        self.pixel_decodes = 0
        model.batch_mode = settings.batch_mode

    # ----- admission capacity, per policy ----------------------------------------------------------
    def capacity(self) -> int:
        s = self.settings
        if s.policy == "reference":
            return 0 if self.active else 1
        if s.policy == "lockstep" and self.active:
            return 0
        return max(0, s.max_batch - len(self.active))

    def _precision(self):
        if self.settings.dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(self.device).type, dtype=getattr(torch, self.settings.dtype))

    @contextlib.contextmanager
    def _stage(self, iteration: int, stage: str):
        t = time.perf_counter()
        yield
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
        self.observer.stage(iteration, stage, time.perf_counter() - t, self.device)

    # ----- one step ------------------------------------------------------------------------------------
    def step(self, new_jobs: list[Job]) -> None:
        t0 = time.perf_counter()
        now = time.monotonic()
        new_jobs = [j for j in new_jobs if self._still_wanted(j, now)]
        self.active = [j for j in self.active if self._still_wanted(j, now)]
        for j in new_jobs:
            j.admitted = now
            self.observer.queue_wait(now - j.submitted)
        tok_new = [j for j in new_jobs if isinstance(j, TokenizeJob)]
        rec_new = [j for j in new_jobs if isinstance(j, ReconstructJob)]
        in_step: list[Job] = [*self.active, *new_jobs]
        if not in_step:  # everything left was cancelled or expired
            self.observer.active(self.device, 0)
            return
        try:
            with torch.inference_mode(), self._precision():
                if tok_new:
                    self._admit(tok_new)
                stepped = list(self.active)
                self._iterate(stepped)
                if rec_new:
                    self._reconstruct(rec_new)
        except Exception as e:  # not a model call (those fail per image): fail this step's images
            err = StepFailed(f"inference step failed on {self.device}: {type(e).__name__}: {e}")
            for j in in_step:
                if not j.future.done():
                    j.fail(err)
            self.active = []
            self.observer.rejected("step_failed")
            raise
        finally:
            self.steps += 1
            self.observer.active(self.device, len(self.active))
        elapsed = time.perf_counter() - t0
        self.step_time = 0.9 * self.step_time + 0.1 * elapsed
        self.observer.step(len(stepped) + len(rec_new), elapsed, self.device)

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

    def _call(self, fn: Callable[[list], list], jobs: list) -> list:
        """One model call over `jobs` (split on failure, see `split_run`); a job whose part failed on
        its own is failed here and left out: returns (job, result) pairs for the rest."""
        def guarded(js):
            if self.fault_hook is not None:
                self.fault_hook(js)
            return fn(js)

        results = split_run(guarded, jobs)
        if len(results) != len(jobs):  # a bug, not an image's fault: the step fails
            raise RuntimeError(f"a model call returned {len(results)} results for {len(jobs)} images")
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

    def _admit(self, jobs: list[TokenizeJob]) -> None:
        with self._stage(0, "prepare"):
            admitted = self._call(lambda js: self.model.prepare(torch.stack([j.image for j in js]).to(self.device)), jobs)
        t = time.monotonic()
        for j, s in admitted:
            j.state = s
            j.compute_started = t
            self.active.append(j)
        self.images_admitted += len(admitted)

    def _cohorts(self, jobs: list[TokenizeJob]) -> list[tuple[int, list[TokenizeJob]]]:
        """(iteration label, jobs) groups: one per iteration (cohort mode) or all at once (padded)."""
        if self.settings.batch_mode == "padded":
            return [(max(j.state.iteration for j in jobs) + 1, jobs)] if jobs else []
        groups: dict[int, list[TokenizeJob]] = {}
        for j in jobs:
            groups.setdefault(j.state.iteration + 1, []).append(j)
        return sorted(groups.items())

    def _iterate(self, jobs: list[TokenizeJob]) -> None:
        halting = self.settings.halting
        measure_all = self.settings.policy == "reference"
        done: list[TokenizeJob] = []
        for it, group in self._cohorts(jobs):
            stepped = self._call(lambda js, it=it: self.model.advance(
                [j.state for j in js], halting=halting, stage_timer=lambda name: self._stage(it, name)), group)
            outs: dict[int, StepOutput] = {id(j): o for j, o in stepped}
            need = [j for j, _ in stepped if measure_all or j.target.needs_quality]
            if need and not halting:  # with halting, advance() decoded the logits already
                with self._stage(it, "decoder"):
                    decoded = self._call(
                        lambda js: list(self.model.decode_logits([outs[id(j)].token_ids for j in js])), need)
                for j, logits in decoded:
                    outs[id(j)].logits = logits
                need = [j for j, _ in decoded]
            metrics: dict[int, tuple[float, float]] = {}
            if need:
                with self._stage(it, "quality"):
                    measured = self._call(lambda js: self._measure(js, outs), need)
                for j, m in measured:
                    metrics[id(j)] = m
                    j.pixel_decodes += 1
                self.pixel_decodes += len(measured)
            for j, o in stepped:
                if j.future.done():  # its decode or measurement failed
                    continue
                l1_, psnr_ = metrics.get(id(j), (None, None))
                if self._record(j, o, l1_, psnr_):
                    done.append(j)
        if done:
            finished = set(map(id, done))
            self.active = [j for j in self.active if id(j) not in finished]
            for j in done:
                self._retire(j)

    def _measure(self, jobs: list[TokenizeJob], outs: dict[int, StepOutput]) -> list[tuple[float, float]]:
        """(L1, PSNR) of each image's reconstruction from its step's logits."""
        rec = self.model.reconstruct(torch.stack([outs[id(j)].logits for j in jobs]))
        l1, psnr = quality(rec, torch.stack([j.state.image for j in jobs]))
        return list(zip(l1.tolist(), psnr.tolist()))

    def _record(self, j: TokenizeJob, o: StepOutput, l1: float | None, psnr: float | None) -> bool:
        """Store this iteration's outcome; True when the image is done."""
        n = j.state.iteration
        rec = IterationRecord(n, o.token_ids.to("cpu", torch.int32).numpy(), l1, psnr)
        if j.want_trajectory:
            j.records.append(rec)
        if j.progress is not None:
            j.progress(rec)
        t = j.target
        cap = t.iteration_cap(self.limits)
        if not t.needs_quality:
            j.best = rec
            if self.settings.policy == "reference" and n < cap:
                return False
            return n >= cap
        met = t.met(l1, psnr)
        if met and j.first_met is None:
            j.first_met = rec
        if j.best is None or t.better(l1, psnr, j.best.l1, j.best.psnr):
            j.best = rec
        if met and self.settings.policy != "reference":
            return True
        return n >= cap

    def _retire(self, j: TokenizeJob) -> None:
        chosen = j.first_met or j.best
        if not j.target.needs_quality:
            chosen = j.best
        now = time.monotonic()
        result = TokenizeResult(
            token_ids=chosen.token_ids,
            iterations=j.state.iteration,
            selected_iteration=chosen.iteration,
            l1=chosen.l1,
            psnr=chosen.psnr,
            target_met=j.first_met is not None or not j.target.needs_quality,
            pixel_decodes=j.pixel_decodes,
            timings={
                "queue_s": (j.admitted or now) - j.submitted,
                "compute_s": now - (j.compute_started or now),
                "total_s": now - j.submitted,
            },
            trajectory=j.records if j.want_trajectory else None,
        )
        j.state = None  # free the sequence now
        self.observer.retired(j.target.kind, result.selected_iteration, result.num_tokens, result.target_met)
        j.resolve(result)

    def _reconstruct(self, jobs: list[ReconstructJob]) -> None:
        with self._stage(0, "decoder"):
            logits = {id(j): lg for j, lg in self._call(
                lambda js: list(self.model.decode_logits([j.token_ids for j in js])), jobs)}
        decoded = [j for j in jobs if id(j) in logits]
        with self._stage(0, "pixels"):
            pixels = self._call(lambda js: list(self.model.reconstruct(torch.stack([logits[id(j)] for j in js]))),
                                decoded) if decoded else []
        for j, p in pixels:
            j.resolve(p.clamp(0, 1).to("cpu"))

