"""An engine that forwards tokenization to Triton Inference Server (`ALIT_ENGINE=triton`).

It has the in-process `Engine`'s face (tokenize / reconstruct / limits / readiness), so the API,
its cache, auth, limits and errors stay the same in front of Triton. Each tokenize call is one gRPC
stream to the decoupled `alit` model with ALL_ITERATIONS on: the per-iteration responses become the
trajectory the cache and stream mode need. Images are sent preprocessed (PIXELS, 8-bit, already the
model's size), so Triton computes exactly what the in-process engine would.

/reconstruct stays in this process (one decoder pass, no recurrence); the model weights are loaded
here for it, for validation limits and for the fingerprint in cache keys.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import torch

from ..model.checkpoint import LoadedModel
from .errors import DeadlineExceeded, QueueFull, StepFailed
from .scheduler import IterationRecord, TokenizeResult
from .targets import ModelLimits, Target, check_token_ids
from .workers import Engine, EngineSettings


class TritonEngine:
    def __init__(self, loaded: LoadedModel, url: str, model_name: str = "alit", local: EngineSettings | None = None):
        self.loaded = loaded
        self.url = url
        self.model_name = model_name
        cfg = loaded.config
        self.limits = ModelLimits(cfg.tokens_per_iter, cfg.max_iters)
        self.local = Engine(loaded, local or EngineSettings(devices="cpu", warmup=False))  # /reconstruct only
        self.workers = self.local.workers
        self.inflight = 0
        self._ready = False
        self._stop = threading.Event()

    # ----- lifecycle --------------------------------------------------------------------------------
    def start(self) -> "TritonEngine":
        self.local.start()
        self._poll_once()
        threading.Thread(target=self._poll, name="triton-ready", daemon=True).start()
        return self

    def _poll_once(self) -> None:
        from tritonclient.grpc import InferenceServerClient

        try:
            with InferenceServerClient(self.url) as c:
                self._ready = bool(c.is_model_ready(self.model_name))
        except Exception:
            self._ready = False

    def _poll(self) -> None:
        while not self._stop.wait(2.0):
            self._poll_once()

    def shutdown(self) -> None:
        self._stop.set()
        self.local.shutdown()

    @property
    def ready(self) -> bool:
        return self._ready and self.local.ready

    @property
    def busy(self) -> bool:
        return self.inflight > 0 or self.local.busy

    @property
    def pixel_decodes(self) -> int:
        return 0

    # ----- work ------------------------------------------------------------------------------------------
    def _inputs(self, image: torch.Tensor, target: Target):
        from tritonclient.grpc import InferInput

        pixels = image.mul(255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
        inputs = [InferInput("PIXELS", [1, *pixels.shape], "UINT8")]
        inputs[0].set_data_from_numpy(pixels[None])
        fields = {"MAX_L1": (target.max_l1, "FP32", np.float32), "MIN_PSNR": (target.min_psnr, "FP32", np.float32),
                  "TOKENS": (target.tokens, "INT32", np.int32), "MAX_TOKENS": (target.max_tokens, "INT32", np.int32)}
        for name, (value, dtype, np_type) in fields.items():
            if value is not None:
                t = InferInput(name, [1, 1], dtype)
                t.set_data_from_numpy(np.array([[value]], dtype=np_type))
                inputs.append(t)
        every = InferInput("ALL_ITERATIONS", [1, 1], "BOOL")
        every.set_data_from_numpy(np.array([[True]]))
        inputs.append(every)
        return inputs

    async def tokenize(self, image: torch.Tensor, target: Target, deadline: float | None = None,
                       trajectory: bool = False, progress=None, tag: str | None = None) -> TokenizeResult:
        from tritonclient.grpc.aio import InferenceServerClient

        started = time.monotonic()
        records: list[IterationRecord] = []
        final = None

        async def run():
            nonlocal final
            client = InferenceServerClient(self.url)
            try:
                async def requests():
                    yield {"model_name": self.model_name, "inputs": self._inputs(image, target)}

                async for result, error in client.stream_infer(requests()):
                    if error is not None:
                        raise _map_error(error)
                    out = {k: result.as_numpy(k) for k in ("TOKEN_IDS", "ITERATIONS", "L1", "PSNR", "TARGET_MET", "IS_FINAL")}
                    l1, psnr = float(out["L1"][0, 0]), float(out["PSNR"][0, 0])
                    rec = IterationRecord(int(out["ITERATIONS"][0, 0]), out["TOKEN_IDS"][0].astype(np.int32),
                                          None if np.isnan(l1) else l1, None if np.isnan(psnr) else psnr)
                    if bool(out["IS_FINAL"][0, 0]):
                        final = (rec, bool(out["TARGET_MET"][0, 0]))
                        return
                    records.append(rec)
                    if progress is not None:
                        progress(rec)
            finally:
                await client.close()

        self.inflight += 1
        try:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            await asyncio.wait_for(run(), timeout)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"deadline passed after {time.monotonic() - started:.2f} s (Triton)") from None
        finally:
            self.inflight -= 1
        if final is None:
            raise StepFailed("Triton closed the stream without a result")
        rec, met = final  # the returned iteration's tokens and quality; ITERATIONS = iterations run
        total = time.monotonic() - started
        return TokenizeResult(token_ids=rec.token_ids, iterations=rec.iteration,
                              selected_iteration=rec.token_ids.shape[0] // self.limits.tokens_per_iter,
                              l1=rec.l1, psnr=rec.psnr, target_met=met, pixel_decodes=0,
                              timings={"queue_s": 0.0, "compute_s": total, "total_s": total},
                              trajectory=records if trajectory else None)

    async def reconstruct(self, token_ids, deadline: float | None = None) -> list[torch.Tensor]:
        for ids in token_ids:
            check_token_ids(ids, self.loaded.config.vq_codebook_size, self.limits)
        return await self.local.reconstruct(token_ids, deadline=deadline)

    def retry_after(self) -> float:
        return 1.0


def _map_error(error: Exception) -> Exception:
    msg = str(error)
    if "admission queue full" in msg or "Exceeds maximum queue size" in msg:
        return QueueFull(-1, 1.0)
    if "timeout" in msg.lower() and "queue" in msg.lower():
        return DeadlineExceeded(msg)
    return StepFailed(f"Triton: {msg}")
