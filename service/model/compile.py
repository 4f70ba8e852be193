"""`torch.compile` for the parts of a model whose shapes a serving step keeps changing.

A packed step's token count changes every step and its attention runs are a Python list, so the
whole step is not one graph. What is compiled, with dynamic shapes so a new batch or token count
does not recompile:
- each transformer block's two per-token parts (`attention_inputs`: ln_1 + q/k/v projection;
  `after_attention`: out projection, residuals, ln_2, MLP), shared by every block of both
  transformers; attention itself stays eager, one SDPA call per run of same-length sequences;
- the convolution stacks (the VQGAN encoder and decoder, or a family's pixel decoder), in place:
  parameter names are unchanged (`speed.py` wraps their `forward`, with channels-last and CUDA graphs
  when those are on too).
How much is compiled is the scope (`ALIT_COMPILE`, read by `compile_scope`, the one rule): `off`,
`vqgan` (the convolution stacks only) or `all` (both; `true` means `all`, as before the scope existed).
Only the `packed` and `varlen` batch modes run the compiled block parts. The first calls compile (tens of
seconds on a CPU); the engine's warm-up pays that before the worker reports ready, running the batch
sizes `warm_batch_sizes` gives, in that order.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal, TypeVar

import torch
import torch.nn as nn

from .transformer import Block, after_attention, attention_inputs

CompileScope = Literal["off", "vqgan", "all"]
_TRUE = {"true", "1", "yes", "on", "all"}
_FALSE = {"false", "0", "no", "off", ""}
M = TypeVar("M", bound=nn.Module)


def compile_scope(value: bool | str | None) -> CompileScope:
    """What `ALIT_COMPILE` (or an engine's `compile`) compiles: a boolean (True: `all`, False: `off`,
    as the setting was before it had a scope) or one of `off`, `vqgan`, `all` (`true`/`false`, `1`/`0`,
    `yes`/`no`, `on` also read). Anything else raises ValueError."""
    if value is None or isinstance(value, bool):
        return "all" if value else "off"
    v = str(value).strip().lower()
    if v == "vqgan":
        return "vqgan"
    if v in _TRUE:
        return "all"
    if v in _FALSE:
        return "off"
    raise ValueError(f"compile: {value!r} is none of off, vqgan, all (or true / false)")


@functools.cache
def _compiled_block_parts() -> tuple[Callable, Callable]:
    """One compiled function per part for the whole process: every block is an argument, not a constant."""
    return (torch.compile(attention_inputs, dynamic=True), torch.compile(after_attention, dynamic=True))


def warm_batch_sizes(max_batch: int) -> tuple[int, ...]:
    """The batch sizes, in order, whose first calls leave a compiled model with a graph for every
    batch size up to `max_batch`. Compiled graphs are specialised to batch-size ranges (1; 2-15; 16
    and more for the VQGAN's convolutions on a CPU), and a size met FIRST gets a graph for that size
    alone: run 1 and 2 before the largest batch, so it gets the general graph. Run them under
    `torch.inference_mode`, as serving does (graphs are specialised to that too)."""
    return (1, 2, max_batch)


def compile_blocks(model: M) -> M:
    """The per-token parts of every transformer block of `model` (any family), compiled in place."""
    parts = _compiled_block_parts()
    for blk in model.modules():
        if isinstance(blk, Block):
            blk.token_fns = parts
    return model


def compile_model(model: M) -> M:
    """Compile `model`'s regions in place, scope `all` (see the module docstring); returns it. The
    same as `speed.prepare_for_device` with `compile="all"` and nothing else, on the device the model
    is on."""
    from .speed import speed_up_conv_stacks

    compile_blocks(model)
    return speed_up_conv_stacks(model, compiled=True)
