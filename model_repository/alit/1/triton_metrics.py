"""The engine's observer hooks as Triton custom metrics (served on Triton's own /metrics port).

Built from the same definitions as the FastAPI service's engine metrics (service/metric_defs.py), so the
Grafana dashboard's engine panels work on a Triton deployment by scraping Triton's metrics port.
Only importable inside Triton's Python-backend stub (it needs triton_python_backend_utils).
"""

from __future__ import annotations

import threading

import triton_python_backend_utils as pb_utils

from service.engine.observer import EngineObserver
from service.metric_defs import REJECT_REASONS, engine_metrics


class TritonMetrics(EngineObserver):
    def __init__(self, model: str, max_probes: int, max_batch: int, token_buckets: tuple[int, ...]):
        kinds = {"histogram": pb_utils.MetricFamily.HISTOGRAM, "gauge": pb_utils.MetricFamily.GAUGE,
                 "counter": pb_utils.MetricFamily.COUNTER}
        self._families = {key: (pb_utils.MetricFamily(d.name, d.help, kinds[d.kind]), d.buckets)
                          for key, d in engine_metrics(max_probes, max_batch, token_buckets).items()}
        self.model = model  # every engine series carries the served model's id
        self._metrics: dict[tuple, object] = {}
        self._lock = threading.Lock()
        for reason in REJECT_REASONS:
            self._get("rejected", reason=reason)  # export zeros so rate() works from the start

    def _get(self, key: str, **labels):
        """One Metric per (family, labels), created on first use (creating one is an IPC round trip)."""
        labels = {"model": self.model, **labels}
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

    def active(self, device, running, encoded):
        self._get("active", device=device).set(running)
        self._get("encoded", device=device).set(encoded)

    def retired(self, target_kind, iterations, num_tokens, target_met):
        self._get("halt", target_kind=target_kind).observe(iterations)
        self._get("tokens", target_kind=target_kind).observe(num_tokens)
        self._get("images", target_kind=target_kind, target_met=str(bool(target_met)).lower()).increment(1)

    def rejected(self, reason):
        self._get("rejected", reason=reason).increment(1)

    def worker_health(self, device, healthy):
        self._get("healthy", device=device).set(1 if healthy else 0)
