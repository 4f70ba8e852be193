"""How the model runs on a device: one rule for what `float32`, `bfloat16` and `float16` mean, and
which kernels are used on CUDA (the engine's workers, `verify`, the benchmark)."""

from __future__ import annotations

import contextlib

import torch


def strict_float32() -> None:
    """float32 means float32 on CUDA too: no TF32 in matrix products or cuDNN convolutions (torch
    allows it in convolutions by default, which moves the VQGAN's outputs by ~2e-3)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def cuda_kernels() -> None:
    """No cuDNN attention: it builds a graph for every new (batch, length) shape — a packed step
    makes a new shape almost every step, and the rebuilds cost more than the attention (measured on
    an H100 in bfloat16: 225 ms steps). Flash / memory-efficient attention take any shape."""
    torch.backends.cuda.enable_cudnn_sdp(False)


def precision(device: str, dtype: str) -> contextlib.AbstractContextManager:
    """The context a model call runs in: plain float32 (strict on CUDA), or autocast to `dtype`."""
    if torch.device(device).type == "cuda":
        cuda_kernels()
    if dtype == "float32":
        if torch.device(device).type == "cuda":
            strict_float32()
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=getattr(torch, dtype))


def is_oom(e: BaseException) -> bool:
    """Whether an exception is the device running out of memory (the engine splits the batch, the
    training budget stops doubling it)."""
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()
