"""`torch.compile` for the parts of ALIT whose shapes a serving step keeps changing.

A packed step's token count changes every step and its attention runs are a Python list, so the
whole step is not one graph. What is compiled, with dynamic shapes so a new batch or token count
does not recompile:
- each transformer block's two per-token parts (`attention_inputs`: ln_1 + q/k/v projection;
  `after_attention`: out projection, residuals, ln_2, MLP), shared by every block of both
  transformers; attention itself stays eager, one SDPA call per run of same-length sequences;
- the VQGAN encoder and decoder (`nn.Module.compile`, in place: parameter names are unchanged).
Only the `packed` batch mode runs the compiled block parts. The first calls compile (tens of
seconds on a CPU); the engine's warm-up pays that before the worker reports ready, running the batch
sizes `warm_batch_sizes` gives, in that order.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from .alit import ALIT
from .transformer import Block, after_attention, attention_inputs


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


def compile_model(model: ALIT) -> ALIT:
    """Compile `model`'s regions in place (see the module docstring); returns it."""
    parts = _compiled_block_parts()
    for blk in [*model.encoder.transformer, *model.decoder.transformer]:
        assert isinstance(blk, Block)
        blk.token_fns = parts
    model.vqgan.encoder.compile(dynamic=True)
    model.vqgan.decoder.compile(dynamic=True)
    return model
