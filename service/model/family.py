"""The model-family interface: all that code outside `service/model/` may know of a tokenizer.

A family (ALIT, KARL, ...) is one file here holding its network, its configuration and a `Family`
record; `registry.py` lists the families, one line each. The engine, cache, API, Triton model,
benchmark and `verify` use only what this file defines, and never branch on a family's name:

* `Tokenizer` — the network's step API (a torch module). `prepare` turns images into per-image
  states; `advance` runs one *probe* for each state: ALIT's next recurrent iteration, or one
  single pass of KARL at the token budget and quality conditioning the probe names; then
  `decode_logits` of token sequences and `reconstruct` pixels from logits measure what a probe gave.
* `Limits` — what the family accepts and how a target becomes probes: the target fields it honours,
  its token budgets, the token sequences `/reconstruct` takes, and `ladder`, the ordered probes a
  target walks. The engine's one halting rule (`Target.select`) walks that ladder: the first probe
  whose measured quality meets the target answers; past the last one, the best of them.

A probe is named by an int key the family chooses (ALIT: the iteration number, 1-based). A key
names the same computation whatever the target that asked for it, so a stored record for a key
answers every target whose ladder holds it: that is what the trajectory cache relies on.

Adding a family: a model file implementing `Tokenizer` with a `Limits` subclass and a `Family`
record, one line in `registry.py`, its golden fixture and tests (see docs/architecture.md).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
import torch

from .transformer import BatchMode

TARGET_FIELDS = ("max_l1", "min_psnr", "tokens", "max_tokens")


class TargetError(ValueError):
    """An invalid target or token sequence. `field` names the offending field for API errors."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass
class StepOutput:
    """What one probe of one image produced."""

    token_ids: torch.Tensor  # (n,) the ids to return / decode
    probe: int = 0  # the key of the probe that ran
    positions: torch.Tensor | None = None  # (n,) each id's position, for families whose tokens carry one
    logits: torch.Tensor | None = None  # (G, V) when the step decoded already (ALIT with 2D-token halting)
    pred_gt_prob: torch.Tensor | None = None  # (G,) ALIT halting: P(own VQGAN code)
    drop_mask: torch.Tensor | None = None  # (G,) ALIT halting: the 2D tokens masked by this step
    trace: dict[str, torch.Tensor] = field(default_factory=dict)  # intermediates when asked


class ImageStateLike(Protocol):
    """What the engine reads of a family's per-image state."""

    image: torch.Tensor  # (3, H, W) the preprocessed input in [0, 1]
    iteration: int  # probes run so far


@dataclass(frozen=True)
class Limits:
    """What a family accepts and the probes a target walks. Subclassed once per family."""

    family: ClassVar[str] = ""
    accepts: ClassVar[tuple[str, ...]] = TARGET_FIELDS  # the target fields it honours
    positional: ClassVar[bool] = False  # token ids come with positions (see `check_sequence`)
    resample: ClassVar[str] = "bicubic"  # the reference's resize filter (imaging.RESAMPLE): bicubic | bilinear
    probe_name: ClassVar[tuple[str, str]] = ("iteration", "iterations")  # what one probe is called, and many
    image_size: int = field(default=256, kw_only=True)  # the model's input side, pixels
    codebook: int = field(default=4096, kw_only=True)  # ids are in [0, codebook)

    @property
    def img_size(self) -> int:
        return self.image_size

    @property
    def codebook_size(self) -> int:
        return self.codebook

    @property
    def max_tokens(self) -> int:
        raise NotImplementedError

    @property
    def max_probes(self) -> int:
        """The longest ladder any target walks (metrics buckets, Retry-After estimates)."""
        raise NotImplementedError

    def ladder(self, max_l1: float | None, min_psnr: float | None, tokens: int | None,
               max_tokens: int | None) -> list[int]:
        """The probes a (validated) target walks, in order."""
        raise NotImplementedError

    def check_budget(self, field: str, value: int) -> int:
        """A client's `tokens` / `max_tokens`, or TargetError naming what this model accepts."""
        raise NotImplementedError

    def check_sequence(self, n: int, positions: np.ndarray | None) -> None:
        """A /reconstruct sequence of `n` ids (and their positions, when given): TargetError if unusable."""
        raise NotImplementedError

    def describe(self, probe: int) -> dict[str, Any]:
        """What a probe key means, for responses (`{}` when the key says it all)."""
        return {}

    def variant(self, halting: bool) -> str:
        """The settings that change this family's tokens, for cache keys."""
        return ""

    def halting_applies(self) -> bool:
        """Whether `ALIT_HALTING` changes this family's tokens (then its cache variant says so)."""
        return self.variant(True) != self.variant(False)

    def token_buckets(self) -> tuple[int, ...]:
        """Histogram buckets for tokens per image."""
        return tuple(sorted({max(1, self.max_tokens * k // 8) for k in range(1, 9)}))

    def info(self) -> dict[str, Any]:
        """Family-specific facts for /v1/models."""
        return {}

    def rejects(self, given: Mapping[str, Any]) -> None:
        """TargetError for the first given target field this family does not honour."""
        for k in TARGET_FIELDS:
            if given.get(k) is not None and k not in self.accepts:
                raise TargetError(k, f"a {self.family} model does not take {k}; it accepts "
                                     f"{', '.join(self.accepts)}")


def quality(recon: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image L1 (mean |recon - input| over C,H,W, unclamped, as the reference measures it)
    and PSNR in dB of the clamped reconstruction (what a client receives as an image)."""
    recon, images = recon.float(), images.float().to(recon.device)
    l1 = (recon - images).abs().flatten(1).mean(1)
    mse = (recon.clamp(0, 1) - images).pow(2).flatten(1).mean(1)
    psnr = 10 * torch.log10(1.0 / mse.clamp_min(1e-10))
    return l1, psnr


def content_seed(image: torch.Tensor) -> int:
    """A 63-bit seed derived from an image's bytes: same image, same halting draws."""
    data = image.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little") >> 1


class Tokenizer(Protocol):
    """The step API every family's network implements (it is a torch module besides)."""

    batch_mode: BatchMode  # how sequences of different lengths share a call (transformer.run_blocks)
    retry_stricter: bool  # conditioned families: a missed target runs again at a stricter conditioning

    @property
    def limits(self) -> Limits: ...

    def prepare(self, images: torch.Tensor, seeds: list[int] | None = None) -> list[Any]:
        """Encode a batch (B, 3, H, W) in [0, 1] into one state per image."""
        ...

    def advance(self, states: list[Any], probes: list[int] | None = None, halting: bool = False,
                stage_timer: Callable[[str], AbstractContextManager] | None = None) -> list[StepOutput]:
        """Run one probe per state (any mix of probes), in as few calls as it can; touches no state
        unless everything succeeded (the engine retries a failing batch on halves)."""
        ...

    def step_weight(self, state: Any, probe: int) -> int:
        """The sequence length a probe runs (how a packed call's time is apportioned)."""
        ...

    def decode_logits(self, token_ids: list[torch.Tensor],
                      positions: list[torch.Tensor | None] | None = None) -> torch.Tensor:
        """Token sequences -> logits (B, G, V) over the base tokenizer's codes, float32."""
        ...

    def reconstruct(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits (B, G, V) -> pixels (B, 3, H, W), not clamped."""
        ...


@dataclass(frozen=True)
class Family:
    """A family's entry in the registry: how to recognise, configure, build and check its models."""

    name: str
    model: Callable[[Any], Any]  # config -> network (random weights): a `Tokenizer` and torch module
    config: Any  # its configuration class: `from_reference_json(d)` (our config.json or the reference's), `to_dict()`
    presets: Mapping[str, Any]  # name -> config
    marker: str  # a state-dict key only this family's checkpoints hold
    reference_key: str  # the key of a reference config.json that names this family's constructor arguments
    infer_config: Callable[[dict[str, torch.Tensor], int | None], Any]  # from tensor shapes (heads override)
    card: Callable[[Any], list[tuple[str, str]]]  # model-card rows for a config
    verifier: str  # "module:function" checking a golden fixture (see service/verify.py)
    check_weights: Callable[[dict[str, torch.Tensor]], None] = lambda sd: None  # refuse unusable variants
