"""An engine that forwards tokenization to Triton Inference Server (`ALIT_ENGINE=triton`).

It has the in-process `Engine`'s face (tokenize / reconstruct / limits / readiness / observer
hooks), so the API, its cache, auth, limits, errors and metrics stay the same in front of Triton.
One TritonEngine per served model, each talking to the Triton model of that name (`alit`, `karl`:
model_repository/), whatever its family. Each tokenize call is one gRPC stream to the decoupled
model, with ALL_ITERATIONS on when a trajectory or progress is asked for: the per-probe responses
(tokens, positions, probe key, quality) become the trajectory the cache and stream mode need, and
the answer is the halting rule (`Target.select`) over them, checked against Triton's own. Images
are sent preprocessed (PIXELS, 8-bit, already the model's size), so Triton computes exactly what
the in-process engine would, and with all four target inputs (NaN / 0 = not set), so requests with
different targets can share one of Triton's batches. Every response carries the served model's
fingerprint; one that differs from ours fails the request (503) instead of mixing two models.
Admission is bounded here like the in-process queue (max_queue + max_batch in flight -> 503).

A server older than the POSITIONS / PROBE outputs still works: positions are then None, and since
its answer does not name its probe, every request asks for the per-probe responses and takes the
answer's key from the halting rule over them.

/reconstruct stays in this process (one decoder pass, no recurrence); the model weights are loaded
here for it, for validation limits and for the fingerprint in cache keys.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..model.checkpoint import LoadedModel
from .errors import DeadlineExceeded, EngineError, EngineStopped, EngineUnavailable, QueueFull, StepFailed
from .observer import EngineObserver
from .records import IterationRecord, Selection, TokenizeResult
from .targets import Target
from .workers import Engine, EngineSettings


@dataclass(frozen=True)
class Reply:
    """One Triton response, read."""

    record: IterationRecord  # its tokens (and positions) and quality; key = PROBE (see `keyed`)
    iterations: int  # ITERATIONS: probes run (the answer) or run so far (a per-probe response)
    final: bool
    target_met: bool
    keyed: bool  # the response named its probe (PROBE); an older server's answer does not


class TritonEngine:
    DEVICE = "triton"  # the `device` label of this engine's metrics

    def __init__(self, loaded: LoadedModel, url: str, model_name: str = "alit", local: EngineSettings | None = None,
                 observer: EngineObserver | None = None):
        self.loaded = loaded
        self.url = url
        self.model_name = model_name
        self.limits = loaded.limits
        settings = local or EngineSettings(devices="cpu", warmup=False)
        self.capacity = settings.max_queue + settings.max_batch  # images in flight at Triton, at most
        self.observer = observer or EngineObserver()
        self.local = Engine(loaded, settings, observer=self.observer)  # /reconstruct only
        self.workers = self.local.workers
        self.inflight = 0
        self.accepting = False
        self._latency = 1.0  # EWMA of a tokenize call's seconds, for Retry-After
        self._poller: threading.Thread | None = None
        self._ready = False
        self._problem = ""  # why not ready, for logs and errors
        self._keyed = True  # Triton's answers name their probe (PROBE); learnt on every (re)connection
        self._stop = threading.Event()
        self._clients: dict[asyncio.AbstractEventLoop, object] = {}

    # ----- lifecycle --------------------------------------------------------------------------------
    def start(self) -> TritonEngine:
        self.local.start()
        self._poll_once()
        self._poller = threading.Thread(target=self._poll, name="triton-ready", daemon=True)
        self._poller.start()
        self.accepting = True
        return self

    def _poll_once(self) -> None:
        """Readiness: the model is ready on Triton and (checked on every (re)connection) it is ours."""
        from tritonclient.grpc import InferenceServerClient

        try:
            with InferenceServerClient(self.url) as c:
                up = bool(c.is_model_ready(self.model_name))
                if not up:
                    self._ready = False
                    self._problem = f"model {self.model_name!r} is not ready on Triton at {self.url}"
                elif not self._ready:
                    self._check_model(c)
        except EngineUnavailable as e:
            self._ready, self._problem = False, str(e)
        except Exception as e:
            self._ready, self._problem = False, f"Triton at {self.url} unreachable: {e}"
        self.observer.worker_health(self.DEVICE, self.ready)

    def _check_model(self, client) -> None:
        """One request of the loosest target (met by the first probe; every family accepts max_l1): its
        response names the served model's fingerprint, and whether Triton's answers name their probe."""
        replies: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: replies.put((result, error)))
        try:
            blank = torch.zeros(3, self.limits.img_size, self.limits.img_size)
            client.async_stream_infer(self.model_name, self._inputs(blank, Target(max_l1=1.0), every=False))
            result, error = replies.get(timeout=60)
        finally:
            client.stop_stream()
        if error is not None:
            raise EngineUnavailable(f"probe request to Triton failed: {error}")
        self._keyed = self._record(result).keyed  # raises EngineUnavailable on another model
        self._ready, self._problem = True, ""

    def _poll(self) -> None:
        while not self._stop.wait(2.0):
            self._poll_once()

    def shutdown(self) -> None:
        self.accepting = False
        self._stop.set()
        self.local.shutdown()

    async def drain(self, timeout: float) -> bool:
        self.accepting = False
        deadline = time.monotonic() + timeout
        while self.inflight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return self.inflight == 0 and await self.local.drain(max(0.0, deadline - time.monotonic()))

    @property
    def ready(self) -> bool:
        return self.accepting and self._ready and self.local.ready

    @property
    def live(self) -> bool:
        return (self._poller is None or self._poller.is_alive() or self._stop.is_set()) and self.local.live

    @property
    def problem(self) -> str:
        """Why Triton is not usable ("" when it is): shown by /readyz."""
        return self._problem or self.local.problem

    @property
    def busy(self) -> bool:
        return self.inflight > 0 or self.local.busy

    def retry_after(self) -> float:
        """About one request's time (they run concurrently at Triton), at least a second."""
        return float(max(1, round(self._latency)))

    # ----- work ------------------------------------------------------------------------------------------
    def _client(self):
        """One gRPC channel per event loop (the service runs one), opened on first use."""
        from tritonclient.grpc.aio import InferenceServerClient

        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            client = self._clients[loop] = InferenceServerClient(self.url)
        return client

    def _inputs(self, image: torch.Tensor, target: Target, every: bool = True):
        from tritonclient.grpc import InferInput

        pixels = image.mul(255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
        inputs = [InferInput("PIXELS", [1, *pixels.shape], "UINT8")]
        inputs[0].set_data_from_numpy(pixels[None])
        nan = float("nan")
        fields = {"MAX_L1": (target.max_l1, nan, "FP32", np.float32),
                  "MIN_PSNR": (target.min_psnr, nan, "FP32", np.float32),
                  "TOKENS": (target.tokens, 0, "INT32", np.int32),
                  "MAX_TOKENS": (target.max_tokens, 0, "INT32", np.int32),
                  "ALL_ITERATIONS": (every, every, "BOOL", bool)}
        for name, (value, unset, dtype, np_type) in fields.items():
            t = InferInput(name, [1, 1], dtype)
            t.set_data_from_numpy(np.array([[unset if value is None else value]], dtype=np_type))
            inputs.append(t)
        return inputs

    def _record(self, result) -> Reply:
        """One response, after checking which model produced it."""
        served = result.as_numpy("MODEL_FINGERPRINT")
        served = served.reshape(-1)[0].decode() if served is not None else "(none)"
        if served != self.loaded.fingerprint:
            self._ready = False
            self._problem = (f"Triton's model {self.model_name!r} is another model (fingerprint {served[:12]}) than "
                             f"this service loaded ({self.loaded.fingerprint[:12]}); give both the same weights "
                             f"(ALIT_MODEL, or ALIT_MODELS={self.model_name}=SPEC on both sides)")
            raise EngineUnavailable(self._problem)
        out = {k: result.as_numpy(k) for k in ("TOKEN_IDS", "ITERATIONS", "L1", "PSNR", "TARGET_MET", "IS_FINAL")}
        probe, positions = result.as_numpy("PROBE"), result.as_numpy("POSITIONS")  # None from an older server
        iterations, final = int(out["ITERATIONS"][0, 0]), bool(out["IS_FINAL"][0, 0])
        # an older server's per-probe responses name their probe in ITERATIONS (ALIT, the only family it served)
        key = int(probe[0, 0]) if probe is not None else iterations
        pos = positions[0].astype(np.int32) if positions is not None and self.limits.positional else None
        l1, psnr = float(out["L1"][0, 0]), float(out["PSNR"][0, 0])
        rec = IterationRecord(key, out["TOKEN_IDS"][0].astype(np.int32), None if np.isnan(l1) else l1,
                              None if np.isnan(psnr) else psnr, positions=pos)
        return Reply(rec, iterations, final, bool(out["TARGET_MET"][0, 0]), keyed=probe is not None or not final)

    def _answer(self, target: Target, records: list[IterationRecord], final: Reply) -> Selection:
        """The answer for `target`: with per-probe responses, the halting rule (`Target.select`) over
        them, which must agree with Triton's final response; without them, the final response itself
        (PROBE names its probe, ITERATIONS the probes run)."""
        if not records:
            if not final.keyed:  # a server swapped for an older one since we checked: ask for every probe
                self._keyed = False
                self.observer.rejected("step_failed")
                raise StepFailed("Triton's answer names no probe (a model.py without the PROBE output); retry")
            return Selection(final.record, final.iterations, final.target_met)
        answer = target.select({r.iteration: r for r in records}, self.limits)
        got = final.record
        if (answer is None or answer.iterations != final.iterations or answer.target_met != final.target_met
                or (final.keyed and answer.record.iteration != got.iteration)
                or not np.array_equal(answer.record.token_ids, got.token_ids)
                or not _same(answer.record.positions, got.positions)):
            self.observer.rejected("step_failed")
            raise StepFailed(f"Triton's answer (probe {got.iteration if final.keyed else '?'}, {final.iterations} "
                             f"run, target met {final.target_met}) disagrees with the halting rule over its own "
                             f"probes ({answer}); are both sides the same version?")
        return answer

    async def tokenize(self, image: torch.Tensor, target: Target, deadline: float | None = None,
                       trajectory: bool = False, progress=None, tag: str | None = None) -> TokenizeResult:
        if not self.accepting:
            self.observer.rejected("stopped")
            raise EngineStopped("the engine is draining or stopped and takes no new work")
        if self.inflight >= self.capacity:
            self.observer.rejected("queue_full")
            raise QueueFull(self.inflight, self.retry_after())
        started = time.monotonic()
        records: list[IterationRecord] = []
        final: Reply | None = None

        async def run():
            nonlocal final

            async def requests():
                # per-probe responses only when someone reads them (the API's cache always does), or
                # when Triton's answer would not name its probe (an older server)
                every = trajectory or progress is not None or not self._keyed
                yield {"model_name": self.model_name, "inputs": self._inputs(image, target, every=every)}

            async for result, error in self._client().stream_infer(requests(), headers=trace_headers() or None):
                if error is not None:
                    raise _map_error(error)
                reply = self._record(result)
                if reply.final:
                    final = reply
                    return
                records.append(reply.record)
                if progress is not None:
                    progress(reply.record)

        self._enter(+1)
        try:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            await asyncio.wait_for(run(), timeout)
        except asyncio.TimeoutError:
            self.observer.rejected("deadline")
            raise DeadlineExceeded(f"deadline passed after {time.monotonic() - started:.2f} s (Triton)") from None
        except asyncio.CancelledError:
            self.observer.rejected("cancelled")
            raise
        except Exception as e:  # Triton's error responses were mapped in run(); gRPC failures are here
            err = e if isinstance(e, EngineError) else _map_error(e)
            if isinstance(err, StepFailed):
                self.observer.rejected("step_failed")
            raise err from (None if err is e else e)
        finally:
            self._enter(-1)
        if final is None:
            self.observer.rejected("step_failed")
            raise StepFailed("Triton closed the stream without a result")
        answer = self._answer(target, records, final)
        total = time.monotonic() - started
        self._latency = 0.9 * self._latency + 0.1 * total
        rec, met = answer.record, answer.target_met
        self.observer.retired(target.kind, answer.iterations, rec.token_ids.shape[0], met)
        return TokenizeResult(token_ids=rec.token_ids, iterations=answer.iterations, selected_iteration=rec.iteration,
                              l1=rec.l1, psnr=rec.psnr, target_met=met, pixel_decodes=0,
                              timings={"queue_s": 0.0, "compute_s": total, "total_s": total},
                              trajectory=records if trajectory else None, positions=rec.positions)

    def _enter(self, n: int) -> None:
        self.inflight += n
        self.observer.active(self.DEVICE, self.inflight, 0)

    async def reconstruct(self, token_ids, deadline: float | None = None, positions: list | None = None
                          ) -> list[torch.Tensor]:
        """In this process (one decoder pass): the local engine checks each sequence (and its positions,
        for families whose tokens carry them) against the model's limits and decodes them."""
        return await self.local.reconstruct(token_ids, deadline=deadline, positions=positions)


def _same(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    """Equal arrays, or both absent."""
    if a is None or b is None:
        return a is b
    return bool(np.array_equal(a, b))


def trace_headers() -> dict[str, str]:
    """The active trace's W3C context (`traceparent`) as gRPC metadata, so Triton's own OpenTelemetry
    spans join the caller's trace; {} when no trace is active (tracing off)."""
    from opentelemetry.propagate import inject

    carrier: dict[str, str] = {}
    inject(carrier)
    return carrier


def _map_error(error: Exception) -> Exception:
    """A Triton / gRPC failure -> the engine error the API maps to a status."""
    msg = str(error)
    if "admission queue full" in msg or "Exceeds maximum queue size" in msg:
        return QueueFull(-1, 1.0)
    if "timeout" in msg.lower() and "queue" in msg.lower():
        return DeadlineExceeded(msg)
    if any(s in msg for s in ("StatusCode.UNAVAILABLE", "failed to connect", "Connection refused", "not ready",
                              "unknown model", "Socket closed")):
        return EngineUnavailable(f"Triton unavailable: {msg[:300]}")
    return StepFailed(f"Triton: {msg}")
