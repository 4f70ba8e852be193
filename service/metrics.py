"""The service's Prometheus registry, built from the definitions in `service.metric_defs`.

`Metrics.observer(model)` implements the engine's observer hooks for one served model (its series
labelled `model`), so each engine reports without knowing Prometheus. One process serves all local
GPUs (one worker thread each), so prometheus-client's single-process mode is right; scale out with
more replicas (each scraped separately) rather than uvicorn workers. prometheus-client's process,
platform and GC collectors are registered too (`process_resident_memory_bytes`,
`process_cpu_seconds_total`, `python_gc_*`, ...).
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from .engine.observer import EngineObserver
from .metric_defs import REJECT_REASONS, MetricDef, engine_metrics, service_metrics

_KINDS = {"counter": Counter, "gauge": Gauge, "histogram": Histogram, "info": Info}


def build(d: MetricDef, registry: CollectorRegistry):
    """One prometheus-client metric from its definition."""
    kw = {"buckets": d.buckets} if d.kind == "histogram" else {}
    return _KINDS[d.kind](d.name, d.help, list(d.labels), registry=registry, **kw)


def process_registry() -> CollectorRegistry:
    """A registry with prometheus-client's process, platform and GC collectors only."""
    r = CollectorRegistry()
    ProcessCollector(registry=r)
    PlatformCollector(registry=r)
    GCCollector(registry=r)
    return r


def starting_exposition() -> bytes:
    """What /metrics serves while the model loads (its series need the model's shape): the process
    collectors, so a scrape succeeds and start-up memory is visible."""
    return generate_latest(process_registry())


class Metrics:
    """The process's registry. Engine series come through `observer(model)`, one per served model."""

    def __init__(self, max_probes: int = 8, max_batch: int = 32,
                 token_buckets: tuple[int, ...] = tuple(range(32, 257, 32))):
        self.registry = r = process_registry()
        e = {k: build(d, r) for k, d in engine_metrics(max_probes, max_batch, token_buckets).items()}
        s = {k: build(d, r) for k, d in service_metrics().items()}
        self.stage_seconds, self.step_seconds, self.step_batch = e["stage"], e["step"], e["batch"]
        self.queue_depth, self.queue_wait_seconds, self.active_images = e["queue"], e["wait"], e["active"]
        self.encoded_images = e["encoded"]
        self.halting_iteration, self.tokens, self.target_met = e["halt"], e["tokens"], e["images"]
        self.rejections, self.worker_healthy = e["rejected"], e["healthy"]
        self.requests, self.request_seconds, self.key_requests = s["requests"], s["request_seconds"], s["key_requests"]
        self.cache_requests, self.cache_errors, self.cache_available = (
            s["cache_requests"], s["cache_errors"], s["cache_available"])
        self.model_info, self.gpu_memory, self.decode_inflight = s["model"], s["gpu_memory"], s["decode_inflight"]
        self.devices: list[str] = []
        for result in ("hit", "miss"):
            self.cache_requests.labels(result)

    # ----- service hooks -----------------------------------------------------------------------------
    def cache(self, kind: str) -> None:
        self.cache_requests.labels(kind).inc()

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        code = str(status)
        self.requests.labels(endpoint, code).inc()
        self.request_seconds.labels(endpoint, code).observe(seconds)

    def key_request(self, key_name: str, outcome: str) -> None:
        """outcome: ok | rate_limited."""
        self.key_requests.labels(key_name, outcome).inc()

    def exposition(self) -> bytes:
        for d in self.devices:
            if d.startswith("cuda"):
                import torch

                self.gpu_memory.labels(d).set(float(torch.cuda.memory_allocated(d)))
        return generate_latest(self.registry)

    def observer(self, model: str) -> ModelSeries:
        """The engine hooks of one served model (its series labelled `model`)."""
        return ModelSeries(self, model)


class ModelSeries(EngineObserver):
    """The engine observer of one served model: `Metrics`' engine series with its `model` label."""

    def __init__(self, m: Metrics, model: str):
        self.m, self.model = m, model
        for reason in REJECT_REASONS:
            m.rejections.labels(model, reason)  # export zeros so rate() works from the start

    def stage(self, iteration, stage, seconds, device):
        self.m.stage_seconds.labels(self.model, str(iteration), stage, device).observe(seconds)

    def step(self, batch_size, seconds, device):
        self.m.step_seconds.labels(self.model, device).observe(seconds)
        self.m.step_batch.labels(self.model, device).observe(batch_size)

    def queue(self, depth):
        self.m.queue_depth.labels(self.model).set(depth)

    def queue_wait(self, seconds):
        self.m.queue_wait_seconds.labels(self.model).observe(seconds)

    def active(self, device, running, encoded):
        self.m.active_images.labels(self.model, device).set(running)
        self.m.encoded_images.labels(self.model, device).set(encoded)

    def retired(self, target_kind, iterations, num_tokens, target_met):
        self.m.halting_iteration.labels(self.model, target_kind).observe(iterations)
        self.m.tokens.labels(self.model, target_kind).observe(num_tokens)
        self.m.target_met.labels(self.model, target_kind, str(bool(target_met)).lower()).inc()

    def rejected(self, reason):
        self.m.rejections.labels(self.model, reason).inc()

    def worker_health(self, device, healthy):
        self.m.worker_healthy.labels(self.model, device).set(1 if healthy else 0)
