"""Every metric's definition as plain data: name, kind, help, labels, buckets.

One table, read by both exporters: `service.metrics` (prometheus-client, the FastAPI service) and
`model_repository/alit/1/triton_metrics.py` (Triton's custom metrics, whose Python-backend stub cannot
import prometheus-client). So the engine series of both have the same names, labels and buckets, and
the Grafana dashboard's engine panels work on either. Nothing here imports prometheus-client.
"""

from __future__ import annotations

from dataclasses import dataclass

from .engine.observer import LATENCY_BUCKETS

REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
REJECT_REASONS = ("queue_full", "deadline", "cancelled", "step_failed", "stopped")


@dataclass(frozen=True)
class MetricDef:
    name: str  # as exposed (a counter's name ends in _total)
    kind: str  # counter | gauge | histogram | info
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] | None = None  # histograms only


def engine_metrics(max_probes: int = 8, max_batch: int = 32,
                   token_buckets: tuple[int, ...] = tuple(range(32, 257, 32))) -> dict[str, MetricDef]:
    """The engine observer's series, keyed by the hook that feeds them (see EngineObserver). Every one
    carries the served model's id (`model`), so several models in one process stay apart. A probe
    is ALIT's recurrent iteration, or one single pass of a conditioned family (model/family.py)."""
    D = MetricDef
    return {
        "stage": D("alit_iteration_stage_seconds", "histogram", "Time of one stage spent on one probe (ALIT: "
                   "recurrent iteration; a packed call over several is apportioned by token share; iteration 0: "
                   "outside the probes, i.e. the encode on admission and /reconstruct decoding)",
                  ("model", "iteration", "stage", "device"), LATENCY_BUCKETS),
        "step": D("alit_step_seconds", "histogram", "Wall time of one scheduler step", ("model", "device"),
                  LATENCY_BUCKETS),
        "batch": D("alit_step_batch_size", "histogram", "Images advanced (or reconstructed) in one step",
                   ("model", "device"), tuple(sorted({1, 2, 4, 8, 16, 32, 64, 128, max_batch}))),
        "queue": D("alit_queue_depth", "gauge", "Images waiting for admission", ("model",)),
        "wait": D("alit_queue_wait_seconds", "histogram", "Time from submission to admission", ("model",),
                  LATENCY_BUCKETS),
        "active": D("alit_active_images", "gauge", "Images iterating on a worker", ("model", "device")),
        "encoded": D("alit_encoded_images", "gauge", "Images a worker has encoded ahead, waiting for a slot",
                     ("model", "device")),
        "halt": D("alit_halting_iteration", "histogram", "Probes (ALIT: iterations) run to reach an image's answer",
                  ("model", "target_kind"), tuple(range(1, max_probes + 1))),
        "tokens": D("alit_tokens_per_image", "histogram", "Tokens returned per image", ("model", "target_kind"),
                    token_buckets),
        "images": D("alit_images_total", "counter", "Images tokenized by the engine",
                    ("model", "target_kind", "target_met")),
        "rejected": D("alit_rejected_total", "counter", "Requests refused or abandoned by the engine",
                      ("model", "reason")),
        "healthy": D("alit_worker_healthy", "gauge", "1 when a worker is warm and serving", ("model", "device")),
    }


def service_metrics() -> dict[str, MetricDef]:
    """The HTTP service's own series."""
    D = MetricDef
    return {
        "requests": D("alit_requests_total", "counter", "HTTP requests", ("endpoint", "status")),
        "request_seconds": D("alit_request_duration_seconds", "histogram", "HTTP request duration, by status: fast "
                             "errors (503 under overload) do not hide slow successes", ("endpoint", "status"),
                             REQUEST_BUCKETS),
        "key_requests": D("alit_key_requests_total", "counter", "Authenticated requests per API key name (the name "
                          "given in the key file, never the key)", ("key_name", "outcome")),
        "cache_requests": D("alit_cache_requests_total", "counter", "Result-cache lookups", ("result",)),
        "cache_errors": D("alit_cache_errors_total", "counter", "Cache operations that failed (Redis down or slow)"),
        "cache_available": D("alit_cache_available", "gauge", "1 when the cache backend answers"),
        "model": D("alit_model", "info", "A served model (id, family, fingerprint, sizes; no filesystem paths)",
                   ("model",)),
        "gpu_memory": D("alit_gpu_memory_allocated_bytes", "gauge", "Bytes allocated by torch on a GPU worker's "
                        "device (the process's resident memory is process_resident_memory_bytes)", ("device",)),
        "decode_inflight": D("alit_decode_inflight_bytes", "gauge", "Decoded-pixel bytes reserved by images being "
                             "decoded now (bounded by ALIT_DECODE_MEMORY_MB)"),
    }
