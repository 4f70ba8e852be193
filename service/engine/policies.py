"""Admission policies: how many waiting images a worker may take into its running batch, and how
an image's iterations are checked. Small classes, one per strategy; the scheduler asks, never
branches on a name.

  continuous  this engine: new images join at every iteration boundary, each leaves as soon as its
              target is met; admission bounded by what buys throughput (see `CostCurve`); their
              VQGAN encodes batched ahead (`to_take`). Saturated (a full batch or more waiting), it
              may refill in cohorts instead (`refill_at`; on a CPU by default once a quarter of the
              batch is left, see `refill_point`): a step whose images sit at fewer distinct
              iterations costs less for the same work;
  lockstep    request-level dynamic batching, as a Triton-style batcher: a batch forms (max size,
              max delay) and runs until its last image is done; nothing joins meanwhile;
  reference   one image at a time, every iteration decoded to pixels, the target applied after
              the last iteration (what the reference `encode()` does).
The last two exist as baselines for the benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

# Continuous batching, saturated, on a CPU: admit once the running images are down to this fraction of
# the limit. Measured against 1.0 (every free slot at once) and 0.5 with the strategies stepped in turn
# (loadtest/saturation_paired.py; docs/benchmarks.md, "Saturation"): 1.0 ran at 0.94-0.99x lock-step's
# throughput, 0.25 at 0.995-1.01x; below saturation it does not act.
CPU_REFILL_AT = 0.25


def refill_setting(value: float | str) -> float | str:
    """`ALIT_REFILL_AT` / `--refill-at` checked: "auto", or a number in (0, 1]; a ValueError names it."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"refill_at: {value!r} is neither 'auto' nor a number in (0, 1]") from None
    if not 0 < number <= 1:
        raise ValueError(f"refill_at: {number} is outside (0, 1] (1 = fill every free slot at once)")
    return number


def refill_point(setting: float | str, device: str) -> float:
    """`ALIT_REFILL_AT` for a worker on `device`: a number as given; "auto" is `CPU_REFILL_AT` on a CPU,
    where a step costs what its tokens cost and mixing iterations is the only thing continuous batching
    pays extra, and 1.0 elsewhere: on a GPU a step costs about the same for any batch below the device's
    saturation, so emptier steps would throw capacity away (simulated 1.59x lock-step with 1.0 against
    1.04x with 0.25; not yet measured on a real GPU: loadtest/gpu_checks.sh, bench_bf16_refill025)."""
    setting = refill_setting(setting)
    if setting != "auto":
        return float(setting)
    return CPU_REFILL_AT if device.startswith("cpu") else 1.0


@dataclass
class Policy:
    max_batch: int = 32
    name: ClassVar[str] = ""
    fill_wait: float = 0.0  # seconds an idle worker waits for a batch to fill
    measure_every_iteration: ClassVar[bool] = False  # decode pixels even where the target needs none
    runs_to_cap: ClassVar[bool] = False  # keep iterating after the target is met
    uses_cost_curve: ClassVar[bool] = False  # `calibrate` acts (ALIT_ADMISSION=measured is worth measuring)

    def capacity(self, active: int, backlog: int = 0) -> int:
        """Images that may start iterating now, with `active` images running and `backlog` waiting
        (encoded, or still in the queue)."""
        return max(0, self.max_batch - active)

    def to_take(self, active: int, ready: int, waiting: int = 0) -> int:
        """Waiting images to take from the queue now (encoded at once, in one call), with `active`
        images running, `ready` encoded ones waiting for a slot and `waiting` in the queue: by default
        just what fills the slots."""
        return max(0, self.capacity(active, ready + waiting) - ready)

    def calibrate(self, knee: int) -> None:
        """The measured cost curve's knee (see admission.py); only continuous batching uses it."""


@dataclass
class Continuous(Policy):
    name: ClassVar[str] = "continuous"
    uses_cost_curve: ClassVar[bool] = True
    in_flight_limit: int | None = None  # from the worker's measured cost curve (admission.py)
    refill_at: float = 1.0  # saturated: admit once at most this fraction of the batch is running

    @property
    def limit(self) -> int:
        return self.max_batch if self.in_flight_limit is None else min(self.max_batch, self.in_flight_limit)

    def _saturated(self, backlog: int) -> bool:
        """A full batch or more is waiting: then the whole batch is the limit, refilled in cohorts."""
        return backlog >= self.max_batch

    def capacity(self, active: int, backlog: int = 0) -> int:
        """Free slots below the limit; but while a full batch or more is waiting (saturated), the limit
        is the whole batch, and no slot opens until the running images are down to `refill_at` x the
        batch, so newcomers arrive as one cohort: the step's images then sit at one to three distinct
        iterations, not one per step since the oldest began, and a step costs less for the same work
        (docs/benchmarks.md, "Saturation"). Below that load every free slot is filled at once, which
        is what keeps latency low, and a measured in-flight limit keeps steps short."""
        if not self._saturated(backlog):
            return max(0, self.limit - active)
        return 0 if active > self.refill_at * self.max_batch else self.max_batch - active

    def to_take(self, active: int, ready: int, waiting: int = 0) -> int:
        """Encode ahead: once the encoded images cannot fill the free slots, take up to a full batch,
        so the VQGAN encode runs as one large call every few steps instead of a small one every step
        (under light load that is what is waiting, at once: nothing waits for a batch to form)."""
        free = self.capacity(active, ready + waiting)
        batch = self.max_batch if self._saturated(ready + waiting) else self.limit
        return 0 if ready >= free else max(0, batch - ready)

    def calibrate(self, knee: int) -> None:
        self.in_flight_limit = knee


@dataclass
class Lockstep(Policy):
    name: ClassVar[str] = "lockstep"
    fill_wait: float = 0.010

    def capacity(self, active: int, backlog: int = 0) -> int:
        return 0 if active else self.max_batch


@dataclass
class Reference(Policy):
    name: ClassVar[str] = "reference"
    measure_every_iteration: ClassVar[bool] = True
    runs_to_cap: ClassVar[bool] = True

    def capacity(self, active: int, backlog: int = 0) -> int:
        return 0 if active else 1


POLICIES: dict[str, type[Policy]] = {p.name: p for p in (Continuous, Lockstep, Reference)}


def make_policy(name: str, max_batch: int, lockstep_max_delay: float = 0.010, refill_at: float = 1.0) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown scheduling policy {name!r} (known: {', '.join(POLICIES)})")
    if name == "lockstep":
        return Lockstep(max_batch=max_batch, fill_wait=lockstep_max_delay)
    if name == "continuous":
        return Continuous(max_batch=max_batch, refill_at=refill_at)
    return POLICIES[name](max_batch=max_batch)
