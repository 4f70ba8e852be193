"""Executing a step's model calls on one device: encode on admission (`prepare`: the VQGAN), one
packed probe for every running image (ALIT: a recurrent iteration; KARL: a single pass), one
decoder call where logits are missing, one pixel decode for every quality check and reconstruction.
The model is any family's `Tokenizer` (model/family.py).
No decisions here (the scheduler decides who runs); a call that fails is retried on halves so an
image that makes the model fail fails alone (`split_run`), and every call is timed for metrics."""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar, cast

import torch

from ..model.family import Tokenizer, content_seed, quality
from ..model.precision import is_oom, precision
from ..model.transformer import check_batch_mode
from .jobs import Job, ReconstructJob, TokenizeJob
from .observer import EngineObserver

T = TypeVar("T")


class ItemFailed:
    """In a `split_run` result list: this item's computation raised even when run on its own."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException):
        self.error = error


def split_run(fn: Callable[[list[T]], list], items: list[T]) -> list:
    """fn(items) -> one result per item. When it raises, the same on each half, recursively: a batch
    that runs out of memory is split until it fits, and an image that makes the model fail ends up
    alone, where its failure becomes an `ItemFailed` in its place, so its batch-mates still get
    their results. Safe because every model call commits no state unless it succeeds."""
    try:
        return fn(items)
    except Exception as e:
        if len(items) < 2:
            return [ItemFailed(e)]
        if is_oom(e) and torch.cuda.is_available():
            torch.cuda.empty_cache()
        mid = len(items) // 2
        return split_run(fn, items[:mid]) + split_run(fn, items[mid:])


class ModelRunner:
    """The model on one device, called once per stage per step over every image of the step."""

    def __init__(self, model: Tokenizer, device: str, dtype: str, batch_mode: str, observer: EngineObserver):
        self.model = model
        self.device = device
        self.dtype = dtype
        self.observer = observer
        self.fault_hook: Callable[[list[Job]], None] | None = None  # tests inject model-call failures
        model.batch_mode = check_batch_mode(batch_mode, device, dtype)  # a ValueError stops the worker's start

    def precision(self) -> contextlib.AbstractContextManager:
        return precision(self.device, self.dtype)

    @contextlib.contextmanager
    def _timed(self, stage: str, iterations: Sequence[int], weights: Sequence[int]) -> Iterator[None]:
        """Time a stage; a call over several iterations is apportioned to each by its share of the
        tokens (`weights`), which is what the call's cost follows."""
        t = time.perf_counter()
        yield
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - t
        share: Counter[int] = Counter()
        for it, w in zip(iterations, weights):
            share[it] += w
        total = sum(share.values()) or 1
        for it, w in sorted(share.items()):
            self.observer.stage(it, stage, elapsed * w / total, self.device)

    def call(self, fn: Callable[[list], list], jobs: list) -> list:
        """fn over `jobs`, split on failure: one result or `ItemFailed` per job."""
        def guarded(js: list) -> list:
            if self.fault_hook is not None:
                self.fault_hook(js)
            return fn(js)

        results = split_run(guarded, jobs)
        if len(results) != len(jobs):  # a bug, not an image's fault: the step fails
            raise RuntimeError(f"a model call returned {len(results)} results for {len(jobs)} images")
        return results

    # ----- the stages ----------------------------------------------------------------------------------
    def prepare(self, jobs: list[TokenizeJob]) -> list:
        """Encode the admitted images: the family's state (or ItemFailed) per job."""
        with self._timed("prepare", [0] * len(jobs), [1] * len(jobs)):
            return self.call(lambda js: self.model.prepare(
                torch.stack([j.image for j in js]).to(self.device),
                seeds=[content_seed(j.image) for j in js]), jobs)  # hashed where the pixels are: the CPU

    def advance(self, jobs: list[TokenizeJob], probes: list[int], halting: bool) -> list:
        """One probe for every job (`probes[i]` for `jobs[i]`), whatever each one's progress: a
        StepOutput per job. With ALIT's halting, the step's decode gives each output its logits too."""
        its = [j.running.iteration + 1 for j in jobs]
        key = {id(j): p for j, p in zip(jobs, probes)}
        weights = [self.model.step_weight(j.running, p) for j, p in zip(jobs, probes)]  # each one's sequence length

        def timer(stage: str) -> contextlib.AbstractContextManager:
            return self._timed(stage, its, weights)

        return self.call(lambda js: self.model.advance([j.running for j in js], probes=[key[id(j)] for j in js],
                                                       halting=halting, stage_timer=timer), jobs)

    def decode_logits(self, jobs: list[Job], tokens: list[tuple[torch.Tensor, torch.Tensor | None]],
                      iterations: list[int]) -> list:
        """(token ids, positions) -> logits (G, V) per job (quality checks without halting, /reconstruct)."""
        seq = {id(j): t for j, t in zip(jobs, tokens)}
        with self._timed("decoder", iterations, [t[0].shape[0] for t in tokens]):
            return self.call(lambda js: list(self.model.decode_logits([seq[id(j)][0] for j in js],
                                                                      [seq[id(j)][1] for j in js])), jobs)

    def pixels(self, jobs: list[Job], logits: list[torch.Tensor], iterations: list[int]) -> list:
        """One VQGAN decode for the step: (L1, PSNR) for a tokenize job (its reconstruction against
        its own image), the image (3, H, W) in [0, 1] on the CPU for a reconstruct job."""
        by_job = {id(j): lg for j, lg in zip(jobs, logits)}

        def run(js: list[Job]) -> list:
            rec = self.model.reconstruct(torch.stack([by_job[id(j)] for j in js]))
            tok = [i for i, j in enumerate(js) if isinstance(j, TokenizeJob)]
            out: list = [None] * len(js)
            if tok:
                l1, psnr = quality(rec[tok], torch.stack([cast(TokenizeJob, js[i]).running.image for i in tok]))
                for i, a, b in zip(tok, l1.tolist(), psnr.tolist()):
                    out[i] = (a, b)
            for i, j in enumerate(js):
                if isinstance(j, ReconstructJob):
                    out[i] = rec[i].clamp(0, 1).to("cpu")
            return out

        stage = "quality" if any(isinstance(j, TokenizeJob) for j in jobs) else "pixels"
        with self._timed(stage, iterations, [1] * len(jobs)):
            return self.call(run, jobs)

