"""The worker pool and the engine's asyncio face.

One worker thread per device, each with its own replica of the model and its own `Scheduler`.
All workers pull from one bounded admission queue whenever they have room, which is least-loaded
dispatch without a dispatcher: a busy worker simply takes nothing. Compute runs in the worker
threads (torch releases the GIL), never on the event loop; results come back through asyncio
futures resolved with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import logging
import math
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..model.checkpoint import LoadedModel
from ..model.compile import warm_batch_sizes
from ..model.speed import Speedups, prepare_for_device
from .admission import CostCurve, admission_mode, cost_curve_for
from .errors import EngineError, EngineStopped, EngineUnavailable, QueueFull, StepFailed
from .jobs import Job, ReconstructJob, TokenizeJob
from .observer import EngineObserver
from .policies import make_policy, refill_point
from .records import IterationRecord, TokenizeResult
from .runner import ModelRunner
from .scheduler import Scheduler
from .targets import Target, check_token_ids

log = logging.getLogger("alit.engine")


def resolve_devices(spec: str) -> list[str]:
    """`auto` -> every CUDA device, else cpu; or an explicit list `cpu` / `cuda:0,cuda:1`."""
    spec = spec.strip().lower()
    if spec == "auto":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [f"cuda:{i}" for i in range(n)] or ["cpu"]
    devices = [d.strip() for d in spec.split(",") if d.strip()]
    for d in devices:
        if d.startswith("cuda"):
            idx = int(d.split(":")[1]) if ":" in d else 0
            if not torch.cuda.is_available() or idx >= torch.cuda.device_count():
                raise ValueError(f"device {d!r} requested but torch sees {torch.cuda.device_count()} CUDA devices")
        elif d != "cpu":
            raise ValueError(f"unknown device {d!r} (use auto, cpu, cuda:N)")
    return devices or ["cpu"]


@dataclass
class EngineSettings:
    devices: str = "auto"
    max_batch: int = 32
    max_queue: int = 256
    policy: str = "continuous"  # continuous | lockstep | reference (the last two: benchmark baselines)
    batch_mode: str = "packed"  # packed | cohort | padded | varlen: how a step shares calls (model/transformer.py)
    halting: bool = True  # 2D-token dynamic halting, as the published model runs
    dtype: str = "float32"
    lockstep_max_delay: float = 0.010  # seconds a lockstep batch waits to fill
    refill_at: float | str = "auto"  # continuous, saturated: admit at this share running (policies.refill_point)
    warmup: bool = True
    admission: str = "auto"  # max_batch | measured: in flight up to the cost curve's knee (at warm-up) | auto
    # (measured on a CPU: admission.admission_mode)
    compile: bool | str = False  # torch.compile: off | vqgan | all (True = all, False = off; model/compile.py)
    channels_last: bool = False  # the VQGAN convolutions in channels-last memory format (model/speed.py)
    cuda_graphs: bool = False  # the VQGAN convolutions as CUDA graphs over bucketed batch sizes (CUDA only)

    def speedups(self) -> Speedups:
        return Speedups.of(channels_last=self.channels_last, compile=self.compile, cuda_graphs=self.cuda_graphs)


class WorkQueue:
    """Bounded FIFO shared by the workers."""

    def __init__(self, capacity: int, observer: EngineObserver):
        self.capacity = capacity
        self.observer = observer
        self._items: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, jobs: list[Job], retry_after: float) -> None:
        """Enqueue all of `jobs` or none of them."""
        with self._cv:
            if len(self._items) + len(jobs) > self.capacity:
                self.observer.rejected("queue_full")
                raise QueueFull(len(self._items), retry_after)
            self._items.extend(jobs)
            self.observer.queue(len(self._items))
            self._cv.notify(len(jobs))

    def take(self, n: int, wait: float) -> list[Job]:
        """Up to n jobs; waits up to `wait` seconds for the first one."""
        with self._cv:
            if not self._items and wait > 0:
                self._cv.wait(wait)
            out = [self._items.popleft() for _ in range(min(n, len(self._items)))]
            if out:
                self.observer.queue(len(self._items))
            return out

    def wake_all(self) -> None:
        with self._cv:
            self._cv.notify_all()


class Worker(threading.Thread):
    def __init__(self, engine: Engine, device: str, model):
        super().__init__(name=f"alit-worker-{device}", daemon=True)
        self.engine = engine
        self.device = device
        st = engine.settings
        self.runner = ModelRunner(model, device, st.dtype, st.batch_mode, engine.observer)
        policy = make_policy(st.policy, st.max_batch, st.lockstep_max_delay, refill_point(st.refill_at, device))
        self.scheduler = Scheduler(self.runner, policy, engine.observer, engine.limits, halting=st.halting)
        self.warm = False
        self.cost_curve: CostCurve | None = None
        self.consecutive_failures = 0
        self.last_error: str | None = None
        self._stop_event = threading.Event()

    @property
    def healthy(self) -> bool:
        return self.is_alive() and self.warm and self.consecutive_failures < 3

    @property
    def load(self) -> int:
        return self.scheduler.holding

    def warm_up(self) -> None:
        """One image through every iteration with a quality target: fills caches. With `compile`, the
        batch sizes of `warm_batch_sizes` (1, 2 and max batch), so serving never waits for a compilation."""
        size = self.engine.limits.img_size
        gen = torch.Generator().manual_seed(0)
        compiled = self.engine.settings.speedups().compile != "off"
        sizes = warm_batch_sizes(self.scheduler.policy.max_batch) if compiled else (1,)
        for n in sizes:
            jobs = [TokenizeJob(image=torch.rand(3, size, size, generator=gen),
                                target=Target(max_l1=1e-9)) for _ in range(n)]  # never met: runs every probe
            self.scheduler.step(list(jobs))
            while self.scheduler.holding:
                self.scheduler.step([])
            for job in jobs:
                job.future.result(timeout=0)
        st = self.engine.settings
        if self.scheduler.policy.uses_cost_curve and admission_mode(st.admission, self.device) == "measured":
            self.cost_curve = cost_curve_for(self.runner, self.engine.limits, st.max_batch, st.halting,
                                             self.engine.loaded.fingerprint, st.speedups())
            self.scheduler.policy.calibrate(self.cost_curve.knee())
            log.info("%s: step cost curve %s -> at most %d images in flight", self.device,
                     {n: round(s * 1000, 1) for n, s in self.cost_curve.step_seconds.items()}, self.cost_curve.knee())
        self.warm = True

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        try:
            self._serve()
        finally:
            if not self._stop_event.is_set():  # the thread is dying (not stopped): answer what it held
                self.engine.worker_died(self)

    def _serve(self) -> None:
        q, s = self.engine.queue, self.scheduler
        fill_wait = s.policy.fill_wait
        while not self._stop_event.is_set():
            cap = s.to_take(len(q))
            idle = not s.holding
            new = q.take(cap, wait=0.05 if idle else 0.0) if cap else []
            if fill_wait and new and idle:  # a request-level batcher waits briefly to fill the batch
                deadline = time.monotonic() + fill_wait
                while len(new) < cap and (left := deadline - time.monotonic()) > 0:
                    new += q.take(cap - len(new), wait=left)
            if not new and not s.holding:
                continue
            try:
                s.step(new, len(q))
                self.consecutive_failures = 0
            except Exception as e:  # the step failed its images (those it got to); keep serving
                self.consecutive_failures += 1
                self.last_error = f"{type(e).__name__}: {e}"
                log.exception("step failed on %s", self.device)
                lost = StepFailed(f"inference step failed on {self.device}: {self.last_error}")
                for j in new:  # taken from the queue but never reached: answered, never lost
                    if not j.future.done():
                        j.fail(lost)
            self.engine.observer.worker_health(self.device, self.healthy)


class Engine:
    """Submit images and token sequences from asyncio; workers do the rest."""

    def __init__(self, loaded: LoadedModel, settings: EngineSettings | None = None,
                 observer: EngineObserver | None = None):
        self.loaded = loaded
        self.settings = settings or EngineSettings()
        self.observer = observer or EngineObserver()
        self.limits = loaded.limits
        self.queue = WorkQueue(self.settings.max_queue, self.observer)
        self.workers: list[Worker] = []
        self.accepting = False
        self._step_time = 0.05  # EWMA of a step's duration (seconds), for Retry-After
        self._iters = float(self.limits.max_probes)  # EWMA of probes per image

    # ----- lifecycle --------------------------------------------------------------------------------
    def start(self) -> Engine:
        st = self.settings
        speedups = st.speedups()
        for dev in resolve_devices(st.devices):
            shared = dev == "cpu" and not self.workers and not speedups.changes_model  # compiling etc. change it
            model = prepare_for_device(self.loaded.model if shared else copy.deepcopy(self.loaded.model), dev,
                                       st.dtype, speedups, st.max_batch)
            w = Worker(self, dev, model)
            if self.settings.warmup:
                w.warm_up()
            else:
                w.warm = True
            self.workers.append(w)
        for w in self.workers:
            w.start()
        self.accepting = True
        return self

    async def drain(self, timeout: float) -> bool:
        """Stop taking work; wait until queued and in-flight images are done. At the timeout (or at
        once when a dead worker means its work can never finish) whatever is left fails with
        EngineStopped, so every caller gets an answer (503 `draining` at the API), and it returns False."""
        self.accepting = False
        deadline = time.monotonic() + timeout
        while self.busy and self.live and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if not self.busy:
            return True
        self._abandon(EngineStopped("the server is shutting down and this work did not finish in time; retry"))
        return False

    def _abandon(self, err: EngineError, workers: list[Worker] | None = None, queued: bool = True) -> None:
        """Fail with `err` the jobs running on `workers` (default: all) and, with `queued`, the queued
        ones (a worker still stepping a failed job drops it)."""
        left: list[Job] = self.queue.take(len(self.queue), wait=0) if queued else []
        for w in self.workers if workers is None else workers:
            left += [*w.scheduler.active, *w.scheduler.ready]
        for j in left:
            if not j.future.done():
                self.observer.rejected("stopped")
                j.fail(err)

    def worker_died(self, w: Worker) -> None:
        """A worker thread ended by an error that escaped its loop: its images are answered at once
        (503 `engine_unavailable`), and the queued ones too when no worker is left to take them."""
        log.error("worker %s died: %s", w.device, w.last_error or "an error escaped its loop")
        last = not [o for o in self.running if o is not w]
        self._abandon(EngineUnavailable(f"the engine worker on {w.device} died; the process needs a restart "
                                        "(its liveness probe fails)"), [w], queued=last)

    def shutdown(self) -> None:
        self.accepting = False
        for w in self.workers:
            w.stop()
        self.queue.wake_all()
        for w in self.workers:
            w.join(timeout=10)

    @property
    def ready(self) -> bool:
        return self.accepting and bool(self.workers) and all(w.healthy for w in self.workers)

    @property
    def running(self) -> list[Worker]:
        """Worker threads running now."""
        return [w for w in self.workers if w.is_alive()]

    @property
    def dead(self) -> list[Worker]:
        """Worker threads that were started and have ended."""
        return [w for w in self.workers if w.ident is not None and not w.is_alive()]

    @property
    def live(self) -> bool:
        """False once a started worker thread has died (a liveness probe should restart the process)."""
        return not self.dead

    @property
    def problem(self) -> str:
        """Why the engine is not ready ("" when it is): workers not started, dead, or failing steps
        (with the last error)."""
        if not self.workers:
            return "engine not started"
        issues, dead = [], self.dead
        for w in self.workers:
            if w in dead:
                issues.append(f"worker {w.device} died")
            elif not w.warm:
                issues.append(f"worker {w.device} warming up")
            elif not w.healthy:
                issues.append(f"worker {w.device} failing ({w.consecutive_failures} steps in a row; "
                              f"last error: {w.last_error})")
        if not issues and not self.accepting:
            issues.append("draining: no new work accepted")
        return "; ".join(issues)

    @property
    def busy(self) -> bool:
        return len(self.queue) > 0 or any(w.scheduler.holding for w in self.workers)

    def set_fault_hook(self, hook) -> None:
        """Tests and fault drills: `hook(jobs)` runs before every model call and may raise."""
        for w in self.workers:
            w.runner.fault_hook = hook

    @property
    def pixel_decodes(self) -> int:
        return sum(w.scheduler.pixel_decodes for w in self.workers)

    def retry_after(self) -> float:
        """Seconds until the queue has room, from its depth and recent step times."""
        step_s = max((w.scheduler.step_time for w in self.workers), default=0.05)
        per_wave = max(1, self.settings.max_batch) * max(1, len(self.workers))
        waves = len(self.queue) / per_wave + 1
        return float(max(1, math.ceil(waves * self._iters * step_s)))

    # ----- submission -----------------------------------------------------------------------------
    def submit(self, jobs: list[Job]) -> None:
        """Queue jobs from any thread (all or none); their futures resolve from a worker thread.
        Raises EngineStopped when draining or stopped, QueueFull when there is no room."""
        if not self.accepting:
            self.observer.rejected("stopped")
            raise EngineStopped("the engine is draining or stopped and takes no new work")
        if self.workers and not self.running:
            self.observer.rejected("stopped")
            raise EngineUnavailable("every engine worker has died; the process needs a restart "
                                    "(its liveness probe fails)")
        self.queue.put(jobs, self.retry_after())

    def _submit(self, jobs: list[Job]) -> list[asyncio.Future]:
        self.submit(jobs)
        return [asyncio.wrap_future(j.future) for j in jobs]

    async def tokenize(self, image: torch.Tensor, target: Target, deadline: float | None = None,
                       trajectory: bool = False, progress=None, tag: str | None = None) -> TokenizeResult:
        """Tokenize one preprocessed image (3, H, W) in [0, 1]. `deadline` is time.monotonic()-based.
        `progress(record)` is called on the event loop after every iteration."""
        size = self.limits.img_size
        if tuple(image.shape) != (3, size, size) or not image.is_floating_point():
            raise ValueError(f"expected a float image of shape (3, {size}, {size}), "
                             f"got {tuple(image.shape)} {image.dtype}")
        loop = asyncio.get_running_loop()
        cb = None
        if progress is not None:
            def cb(rec: IterationRecord) -> None:
                loop.call_soon_threadsafe(progress, rec)
        job = TokenizeJob(deadline=deadline, image=image, target=target, want_trajectory=trajectory,
                          progress=cb, tag=tag)
        (fut,) = self._submit([job])
        result = await fut
        self._iters = 0.95 * self._iters + 0.05 * result.iterations
        return result

    async def reconstruct(self, token_ids: list[np.ndarray] | list[list[int]], deadline: float | None = None,
                          positions: list | None = None) -> list[torch.Tensor]:
        """Token sequences (with their ids' positions, for families whose tokens carry them) ->
        images (3, H, W) in [0, 1], one job per sequence, batched by the workers."""
        pos = positions if positions is not None else [None] * len(token_ids)
        seqs = [check_token_ids(ids, self.limits, p) for ids, p in zip(token_ids, pos)]
        futs = self._submit([ReconstructJob(deadline=deadline, token_ids=t, positions=p) for t, p in seqs])
        return list(await asyncio.gather(*futs))
