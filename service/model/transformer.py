"""Transformer pieces every family in this package shares (ALIT, KARL: one codebase upstream).

Pre-LN blocks with `nn.MultiheadAttention`'s packed parameter layout (so published state dicts load
strictly), run through fused SDPA; `run_blocks` runs sequences of different lengths through a
stack of blocks in one call per layer ("packed"; "varlen": the same with attention in ONE
variable-length flash-attention call, CUDA in float16 / bfloat16), per same-length cohort, or padded
with masks, and each sequence's result depends only on itself. `LatentQuantizer` is the 1D vector
quantiser (L2-normalised codes) both families use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import BATCH_MODES, BatchMode

VARLEN_DTYPES = ("float16", "bfloat16")  # what flash attention's variable-length kernel takes


def check_batch_mode(mode: str, device: str, dtype: str) -> BatchMode:
    """`mode` for a model serving on `device` in `dtype`, or a ValueError naming what is wrong: an unknown
    mode, or "varlen" where its kernel cannot run (not CUDA, float32, or a torch without it)."""
    if mode not in BATCH_MODES:
        raise ValueError(f"batch mode {mode!r} is none of {', '.join(BATCH_MODES)}")
    if mode == "varlen":
        if torch.device(device).type != "cuda" or dtype not in VARLEN_DTYPES:
            raise ValueError(f"batch mode 'varlen' runs flash attention's variable-length kernel: CUDA in "
                             f"{' or '.join(VARLEN_DTYPES)} only, and here it would run on {device!r} in {dtype} "
                             "(use packed there)")
        if _varlen_kernel() is None:
            raise ValueError(f"batch mode 'varlen' needs torch.nn.attention.varlen (torch >= 2.10); this is "
                             f"torch {torch.__version__}")
    return cast(BatchMode, mode)


def _varlen_kernel() -> Callable | None:
    """torch's variable-length attention (q, k, v as (tokens, heads, head_dim); cumulative sequence
    starts; longest lengths), or None where this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


class Runs:
    """How `pack` laid sequences out: `groups`, runs of same-length sequences as (start row, count,
    length). With `varlen_on` (a device), also what one variable-length attention call per layer needs,
    found once per stack rather than per layer: the kernel, every sequence's boundaries on the device
    (int32 cumulative starts, N + 1 of them) and the longest length."""

    def __init__(self, groups: list[tuple[int, int, int]], varlen_on: torch.device | None = None):
        self.groups = groups
        self.kernel: Callable | None = None
        if varlen_on is not None:
            ends = [start + (j + 1) * length for start, count, length in groups for j in range(count)]
            self.kernel = _varlen_kernel()
            self.cu_seqlens = torch.tensor([0, *ends], dtype=torch.int32, device=varlen_on)
            self.max_len = max(length for _, _, length in groups)


class Attention(nn.Module):
    """Multi-head self-attention keeping nn.MultiheadAttention's packed parameter layout."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, w = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).split(w, dim=-1)
        q, k, v = (t.view(b, n, self.heads, w // self.heads).transpose(1, 2) for t in (q, k, v))
        mask = None if key_mask is None else key_mask[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(y.transpose(1, 2).reshape(b, n, w))

    def attend_packed(self, qkv: torch.Tensor, runs: Runs) -> torch.Tensor:
        """`qkv` (N, 3W): the projections of several sequences back to back, laid out as `runs` says.
        Attention per run of same-length sequences, or for all of them in one variable-length call
        where `runs` has their boundaries; (N, W) before out_proj."""
        w = qkv.shape[-1] // 3
        d = w // self.heads
        if runs.kernel is not None:
            q, k, v = (t.view(-1, self.heads, d) for t in qkv.split(w, dim=-1))
            return runs.kernel(q, k, v, runs.cu_seqlens, runs.cu_seqlens, runs.max_len, runs.max_len).reshape(-1, w)
        ys = []
        for start, count, length in runs.groups:
            part = qkv[start : start + count * length].view(count, length, 3 * w)
            q, k, v = (t.view(count, length, self.heads, d).transpose(1, 2) for t in part.split(w, dim=-1))
            y = F.scaled_dot_product_attention(q, k, v)
            ys.append(y.transpose(1, 2).reshape(count * length, w))
        return ys[0] if len(ys) == 1 else torch.cat(ys)


class MLP(nn.Module):
    def __init__(self, width: int, ratio: float):
        super().__init__()
        self.c_fc = nn.Linear(width, int(width * ratio))
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(int(width * ratio), width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp_ratio)
        self.token_fns: tuple[Callable, Callable] = (attention_inputs, after_attention)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), key_mask)
        return x + self.mlp(self.ln_2(x))

    def forward_packed(self, x: torch.Tensor, runs: Runs) -> torch.Tensor:
        """`x` (N, W): several sequences back to back (see `pack`). Everything but attention works per
        token, in the two functions of `token_fns` (plain, or compiled: model/compile.py)."""
        before, after = self.token_fns
        return after(self, x, self.attn.attend_packed(before(self, x), runs))


def attention_inputs(blk: Block, x: torch.Tensor) -> torch.Tensor:
    """A packed block's first per-token part: ln_1 and the q/k/v projection, (N, 3W)."""
    return F.linear(blk.ln_1(x), blk.attn.in_proj_weight, blk.attn.in_proj_bias)


def after_attention(blk: Block, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A packed block's second per-token part: out projection, residual, ln_2, MLP, residual."""
    x = x + blk.attn.out_proj(y)
    return x + blk.mlp(blk.ln_2(x))


Seq = torch.Tensor | tuple[torch.Tensor, ...]  # a sequence, or the pieces it is the concatenation of


def _len(s: Seq) -> int:
    return s.shape[0] if isinstance(s, torch.Tensor) else sum(p.shape[0] for p in s)


def pack(seqs: list[Seq]) -> tuple[torch.Tensor, list[tuple[int, int, int]], list[slice]]:
    """Concatenate (L_i, W) sequences (or their pieces), grouped by length, in ONE copy: (packed
    (N, W), runs of (start, count, length) for `forward_packed`, each sequence's rows)."""
    order = sorted(range(len(seqs)), key=lambda i: _len(seqs[i]))
    rows: list[slice] = [slice(0)] * len(seqs)
    groups: list[tuple[int, int, int]] = []
    start = 0
    for i in order:
        n = _len(seqs[i])
        if groups and groups[-1][2] == n:
            s0, c, _ = groups[-1]
            groups[-1] = (s0, c + 1, n)
        else:
            groups.append((start, 1, n))
        rows[i] = slice(start, start + n)
        start += n
    pieces: list[torch.Tensor] = []
    for i in order:
        s = seqs[i]
        pieces += [s] if isinstance(s, torch.Tensor) else list(s)
    packed = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    return packed, groups, rows


def run_blocks(blocks: nn.ModuleList, seqs: list[Seq], mode: BatchMode) -> list[torch.Tensor]:
    """Run a list of (L_i, W) sequences of possibly different lengths through `blocks`.

    "packed": every sequence's tokens concatenated (no padding), each LayerNorm / linear / MLP one
    call over all of them, attention one call per run of same-length sequences. "varlen": the same,
    with attention one variable-length call for all of them (`check_batch_mode` says where). "cohort": one
    batched call per distinct length. "padded": one call, keys beyond each sequence's length masked
    out. Either way each sequence's result depends only on itself.
    """

    def run(x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        for blk in blocks:
            x = blk(x, key_mask)
        return x

    if mode in ("packed", "varlen"):
        x, groups, rows = pack(seqs)
        runs = Runs(groups, x.device if mode == "varlen" else None)
        for blk in blocks:
            x = cast(Block, blk).forward_packed(x, runs)
        return [x[r] for r in rows]
    full = [s if isinstance(s, torch.Tensor) else torch.cat(s) for s in seqs]
    lengths = [s.shape[0] for s in full]
    out: list[torch.Tensor] = [None] * len(full)  # type: ignore[list-item]
    if mode == "padded" and len(set(lengths)) > 1:
        lmax = max(lengths)
        x = torch.nn.utils.rnn.pad_sequence(full, batch_first=True)
        key_mask = torch.arange(lmax, device=x.device)[None, :] < torch.tensor(lengths, device=x.device)[:, None]
        y = run(x, key_mask)
        return [y[i, :n] for i, n in enumerate(lengths)]
    by_len: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        by_len.setdefault(n, []).append(i)
    for idx in by_len.values():
        y = run(torch.stack([full[i] for i in idx]))
        for j, i in enumerate(idx):
            out[i] = y[j]
    return out


class LatentQuantizer(nn.Module):
    """The 1D vector quantiser: nearest code by distance between L2-normalised vectors."""

    def __init__(self, codebook_size: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, dim)
        nn.init.uniform_(self.embedding.weight, -1 / codebook_size, 1 / codebook_size)

    def codes(self) -> torch.Tensor:
        """The L2-normalised codebook (what the decoder receives), float32."""
        return F.normalize(self.embedding.weight.float(), dim=-1)

    def forward(self, prequant: torch.Tensor) -> torch.Tensor:
        """(..., D) quantiser inputs -> (...) code ids. Always float32, as the reference."""
        z = F.normalize(prequant.float(), dim=-1)
        e = self.codes()
        d = z.pow(2).sum(-1, keepdim=True) + e.pow(2).sum(-1) - 2 * z @ e.t()
        return d.argmin(dim=-1)
