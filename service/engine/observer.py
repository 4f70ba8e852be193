"""Instrumentation hooks. The engine calls these; `service.metrics` turns them into Prometheus series.

Every method has a no-op default so an engine runs without metrics (tests, benchmarks, Triton).
Calls come from worker threads; implementations must be thread-safe.
"""

from __future__ import annotations

# Histogram buckets (seconds) for the timing hooks, shared by every exporter of these hooks (the
# service's Prometheus registry and Triton's custom metrics) so their series line up.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class EngineObserver:
    def stage(self, iteration: int, stage: str, seconds: float, device: str) -> None:
        """Time of one stage (prepare | encoder | decoder | quality | pixels) spent on `iteration`
        (a packed call over several iterations is apportioned to each by its share of the tokens)."""

    def step(self, batch_size: int, seconds: float, device: str) -> None:
        """A whole scheduler step: images advanced in it and wall time."""

    def queue(self, depth: int) -> None:
        """Images waiting for admission, after every change."""

    def queue_wait(self, seconds: float) -> None:
        """Time an image waited between submission and admission."""

    def active(self, device: str, running: int, encoded: int) -> None:
        """After a step: images iterating on a worker, and images it has encoded ahead that wait
        for a slot (continuous batching's `Scheduler.ready`)."""

    def retired(self, target_kind: str, iterations: int, num_tokens: int, target_met: bool) -> None:
        """An image finished: the iteration it halted at and its token count."""

    def rejected(self, reason: str) -> None:
        """A request refused or abandoned: queue_full | deadline | cancelled | step_failed | stopped."""

    def worker_health(self, device: str, healthy: bool) -> None:
        """A worker's health after every step."""
