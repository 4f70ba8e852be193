"""The engine's observer hooks as Triton custom metrics (served on Triton's own /metrics port).

Same names, labels and buckets as the FastAPI service's engine metrics (service/metrics.py), so the
Grafana dashboard's engine panels work on a Triton deployment by scraping Triton's metrics port.
Only importable inside Triton's Python-backend stub (it needs triton_python_backend_utils).
"""

from __future__ import annotations

import threading

import triton_python_backend_utils as pb_utils

from service.engine.observer import LATENCY_BUCKETS, EngineObserver


class TritonMetrics(EngineObserver):
    REJECT_REASONS = ("queue_full", "deadline", "cancelled", "step_failed", "stopped")

    def __init__(self, max_iters: int, max_batch: int, max_tokens: int, tokens_per_iter: int):
        H, G, C = pb_utils.MetricFamily.HISTOGRAM, pb_utils.MetricFamily.GAUGE, pb_utils.MetricFamily.COUNTER
        family = pb_utils.MetricFamily
        self._families = {
            "stage": (family("alit_iteration_stage_seconds", "Time of one stage of one recurrent iteration for a "
                             "cohort of images (iteration 0: VQGAN encode on admission)", H), LATENCY_BUCKETS),
            "step": (family("alit_step_seconds", "Wall time of one scheduler step", H), LATENCY_BUCKETS),
            "batch": (family("alit_step_batch_size", "Images advanced in one step", H),
                      sorted({1, 2, 4, 8, 16, 32, 64, 128, max_batch})),
            "queue": (family("alit_queue_depth", "Images waiting for admission", G), None),
            "wait": (family("alit_queue_wait_seconds", "Time from submission to admission", H), LATENCY_BUCKETS),
            "active": (family("alit_active_images", "Images in flight on a worker", G), None),
            "halt": (family("alit_halting_iteration", "Iteration whose tokens an image returned", H),
                     list(range(1, max_iters + 1))),
            "tokens": (family("alit_tokens_per_image", "Tokens returned per image", H),
                       list(range(tokens_per_iter, max_tokens + 1, tokens_per_iter))),
            "images": (family("alit_images_total", "Images tokenized by the engine", C), None),
            "rejected": (family("alit_rejected_total", "Requests refused or abandoned by the engine", C), None),
            "healthy": (family("alit_worker_healthy", "1 when a worker is warm and serving", G), None),
        }
        self._metrics: dict[tuple, object] = {}
        self._lock = threading.Lock()
        for reason in self.REJECT_REASONS:
            self._get("rejected", reason=reason)  # export zeros so rate() works from the start

    def _get(self, key: str, **labels):
        """One Metric per (family, labels), created on first use (creating one is an IPC round trip)."""
        k = (key, *sorted(labels.items()))
        with self._lock:
            m = self._metrics.get(k)
            if m is None:
                fam, buckets = self._families[key]
                kw = {} if buckets is None else {"buckets": list(buckets)}
                m = fam.Metric(labels=labels, **kw)
                self._metrics[k] = m
            return m

    def stage(self, iteration, stage, seconds, device):
        self._get("stage", iteration=str(iteration), stage=stage, device=device).observe(seconds)

    def step(self, batch_size, seconds, device):
        self._get("step", device=device).observe(seconds)
        self._get("batch", device=device).observe(batch_size)

    def queue(self, depth):
        self._get("queue").set(depth)

    def queue_wait(self, seconds):
        self._get("wait").observe(seconds)

    def active(self, device, count):
        self._get("active", device=device).set(count)

    def retired(self, target_kind, iterations, num_tokens, target_met):
        self._get("halt", target_kind=target_kind).observe(iterations)
        self._get("tokens", target_kind=target_kind).observe(num_tokens)
        self._get("images", target_kind=target_kind, target_met=str(bool(target_met)).lower()).increment(1)

    def rejected(self, reason):
        self._get("rejected", reason=reason).increment(1)

    def worker_health(self, device, healthy):
        self._get("healthy", device=device).set(1 if healthy else 0)
