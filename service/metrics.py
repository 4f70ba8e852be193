"""Every Prometheus metric of the service, defined once, on a registry of its own.

`Metrics` implements the engine's observer hooks, so the engine reports without knowing
Prometheus. One process serves all local GPUs (one worker thread each), so prometheus-client's
single-process mode is right; scale out with more replicas (each scraped separately) rather than
uvicorn workers.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

from .engine.observer import LATENCY_BUCKETS, EngineObserver

REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics(EngineObserver):
    def __init__(self, max_iters: int = 8, max_batch: int = 32, max_tokens: int = 256, tokens_per_iter: int = 32):
        self.registry = r = CollectorRegistry()
        self.stage_seconds = Histogram(
            "alit_iteration_stage_seconds", "Time of one stage of one recurrent iteration for a cohort of images "
            "(iteration 0: outside the recurrence, i.e. VQGAN encode on admission and /reconstruct decoding)",
            ["iteration", "stage", "device"], buckets=LATENCY_BUCKETS, registry=r)
        self.step_seconds = Histogram("alit_step_seconds", "Wall time of one scheduler step", ["device"],
                                      buckets=LATENCY_BUCKETS, registry=r)
        batch_buckets = sorted({1, 2, 4, 8, 16, 32, 64, 128, max_batch})
        self.step_batch = Histogram("alit_step_batch_size", "Images advanced (or reconstructed) in one step",
                                    ["device"], buckets=batch_buckets, registry=r)
        self.queue_depth = Gauge("alit_queue_depth", "Images waiting for admission", registry=r)
        self.queue_wait_seconds = Histogram("alit_queue_wait_seconds", "Time from submission to admission",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.active_images = Gauge("alit_active_images", "Images in flight on a worker", ["device"], registry=r)
        self.halting_iteration = Histogram(
            "alit_halting_iteration", "Iteration whose tokens an image returned", ["target_kind"],
            buckets=list(range(1, max_iters + 1)), registry=r)
        self.tokens = Histogram("alit_tokens_per_image", "Tokens returned per image", ["target_kind"],
                                buckets=list(range(tokens_per_iter, max_tokens + 1, tokens_per_iter)), registry=r)
        self.target_met = Counter("alit_images_total", "Images tokenized by the engine", ["target_kind", "target_met"],
                                  registry=r)
        self.requests = Counter("alit_requests_total", "HTTP requests", ["endpoint", "status"], registry=r)
        self.request_seconds = Histogram("alit_request_duration_seconds", "HTTP request duration", ["endpoint"],
                                         buckets=REQUEST_BUCKETS, registry=r)
        self.cache_requests = Counter("alit_cache_requests_total", "Result-cache lookups", ["result"], registry=r)
        self.cache_errors = Counter("alit_cache_errors_total", "Cache operations that failed (Redis down or slow)",
                                    registry=r)
        self.cache_available = Gauge("alit_cache_available", "1 when the cache backend answers", registry=r)
        self.rejections = Counter("alit_rejected_total", "Requests refused or abandoned by the engine", ["reason"],
                                registry=r)
        self.worker_healthy = Gauge("alit_worker_healthy", "1 when a worker is warm and serving", ["device"],
                                    registry=r)
        self.model_info = Info("alit_model", "The served model", registry=r)
        self.device_memory = Gauge("alit_device_memory_bytes", "Memory in use per worker device: bytes allocated "
                                   "by torch on a GPU, the process's resident set on the CPU", ["device"], registry=r)
        self.devices: list[str] = []
        for reason in ("queue_full", "deadline", "cancelled", "step_failed", "stopped"):
            self.rejections.labels(reason)  # export zeros so rate() works from the start
        for result in ("hit", "miss"):
            self.cache_requests.labels(result)

    # ----- engine hooks ----------------------------------------------------------------------------
    def stage(self, iteration, stage, seconds, device):
        self.stage_seconds.labels(str(iteration), stage, device).observe(seconds)

    def step(self, batch_size, seconds, device):
        self.step_seconds.labels(device).observe(seconds)
        self.step_batch.labels(device).observe(batch_size)

    def queue(self, depth):
        self.queue_depth.set(depth)

    def queue_wait(self, seconds):
        self.queue_wait_seconds.observe(seconds)

    def active(self, device, count):
        self.active_images.labels(device).set(count)

    def retired(self, target_kind, iterations, num_tokens, target_met):
        self.halting_iteration.labels(target_kind).observe(iterations)
        self.tokens.labels(target_kind).observe(num_tokens)
        self.target_met.labels(target_kind, str(bool(target_met)).lower()).inc()

    def rejected(self, reason):
        self.rejections.labels(reason).inc()

    def worker_health(self, device, healthy):
        self.worker_healthy.labels(device).set(1 if healthy else 0)

    # ----- service hooks -----------------------------------------------------------------------------
    def cache(self, kind: str) -> None:
        self.cache_requests.labels(kind).inc()

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.request_seconds.labels(endpoint).observe(seconds)

    def exposition(self) -> bytes:
        for d in self.devices:
            self.device_memory.labels(d).set(device_memory_bytes(d))
        return generate_latest(self.registry)


def device_memory_bytes(device: str) -> float:
    if device.startswith("cuda"):
        import torch

        return float(torch.cuda.memory_allocated(device))
    with open("/proc/self/statm") as f:  # resident pages x page size
        return float(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
