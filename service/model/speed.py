"""How a model is prepared for its device, and three ways to make its convolution stacks faster,
each behind its own setting (all off by default; they compose with each other and with every dtype
and batch mode):

- channels-last (`ALIT_CHANNELS_LAST`): the stacks' weights in `torch.channels_last` and their
  inputs converted to it, so the convolutions run NHWC (cuDNN's tensor-core layout in bfloat16);
  what a stack returns is converted back to the default (contiguous) layout, so the rest of the model
  gets the same tensors as before.
- torch.compile of the stacks (`ALIT_COMPILE=vqgan`, or `all` with the transformer blocks too;
  compile.py holds the scope rule), dynamic shapes.
- CUDA graphs (`ALIT_CUDA_GRAPHS`): a call's batch is padded up to a bucket (powers of two up to the
  max batch, and the max batch itself; a larger call runs in max-batch chunks), one `CUDAGraph` per
  bucket replays the stack on static buffers, and the rows asked for are copied out. Every operation
  in a stack works sample by sample (convolutions, GroupNorm, SiLU, pooling, nearest upsampling), so a
  padding row changes no real row (tests/test_speed_settings.py checks every batch size). The graphs
  are captured when the model is prepared (under the dtype's autocast and inference mode, as serving
  calls them; a call that meets a new input shape or dtype captures one more), so serving never
  captures. CUDA only: `prepare_for_device` refuses any other device, which stops start-up.

The stacks are found on the model, never by family name: a `.vqgan` (a `VQGAN`: its encoder and
decoder; ALIT, KARL) and a `.pixel_decoder` module (a family whose pixel stage is a decoder alone:
TiTok / One-D-Piece). A stack keeps its parameters and their names (state dicts and fingerprints do
not change); what changes is the module's `forward`, replaced on the instance by a `StackForward`
(a deep copy of the model gets fresh ones: compiled again, graphs captured again on first use).
Prepare a model after moving it: graphs hold the device memory they were captured on.

`prepare_for_device` is the one place that decides how a model runs on its device (the engine's
workers call it for each device). `python -m service.model.speed` compares every setting with the
default on a device: the stacks' outputs and their cost per image (loadtest/gpu_checks.sh runs it).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, TypeVar, cast

import torch
import torch.nn as nn

from .compile import CompileScope, compile_blocks, compile_scope, warm_batch_sizes
from .config import VQGANConfig
from .precision import precision
from .vqgan import VQGAN

M = TypeVar("M", bound=nn.Module)
GRAPH_WARMUP_CALLS = 3  # eager calls on a side stream before a capture (cuDNN / cuBLAS set-up, compilation)


@dataclass(frozen=True)
class Speedups:
    """The settings `prepare_for_device` applies (ALIT_CHANNELS_LAST, ALIT_COMPILE, ALIT_CUDA_GRAPHS)."""

    channels_last: bool = False
    compile: CompileScope = "off"
    cuda_graphs: bool = False

    @classmethod
    def of(cls, channels_last: bool = False, compile: bool | str | None = False,
           cuda_graphs: bool = False) -> Speedups:
        return cls(bool(channels_last), compile_scope(compile), bool(cuda_graphs))

    @property
    def changes_model(self) -> bool:
        """Whether preparing changes the model object itself (so a caller that shares it must copy it)."""
        return self.channels_last or self.cuda_graphs or self.compile != "off"

    def describe(self) -> str:
        on = [n for n, v in (("channels-last", self.channels_last), (f"compile={self.compile}", self.compile != "off"),
                             ("cuda-graphs", self.cuda_graphs)) if v]
        return ", ".join(on) or "default"


# ----- the convolution stacks of a model --------------------------------------------------------------
@dataclass
class ConvStack:
    name: str
    module: nn.Module
    sample_shape: tuple[int, ...] | None  # one input's shape (C, H, W) when the model says it: graphs captured ahead


def conv_stacks(model: nn.Module) -> list[ConvStack]:
    """The convolution stacks of `model`, whatever its family (see the module docstring)."""
    out: list[ConvStack] = []
    vq = getattr(model, "vqgan", None)
    if isinstance(vq, VQGAN):
        c = vq.cfg
        out.append(ConvStack("vqgan.encoder", vq.encoder, (c.in_channels, c.resolution, c.resolution)))
        out.append(ConvStack("vqgan.decoder", vq.decoder, (c.z_channels, c.grid_size, c.grid_size)))
    pix = getattr(model, "pixel_decoder", None)
    if isinstance(pix, nn.Module):
        pc = getattr(getattr(model, "cfg", None), "pixel_vqgan", None)
        shape = (pc.z_channels, pc.grid_size, pc.grid_size) if isinstance(pc, VQGANConfig) else None
        out.append(ConvStack("pixel_decoder", pix, shape))
    return out


# ----- CUDA graphs over bucketed batch sizes ---------------------------------------------------------
def bucket_sizes(max_batch: int) -> tuple[int, ...]:
    """1, 2, 4, ... below `max_batch`, then `max_batch`."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return (*sizes, max_batch)


def bucket_for(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket holding `n` rows (`n` at most the largest bucket)."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} rows exceed the largest bucket ({buckets[-1]})")


def capture_order(buckets: tuple[int, ...]) -> tuple[int, ...]:
    """1 and 2 first, then the largest and down (compile.warm_batch_sizes' order, so a compiled stack gets
    its general graph at 2; large before small, so the smaller graphs reuse the larger one's memory pool)."""
    first = [b for b in buckets if b <= 2]
    return (*first, *sorted((b for b in buckets if b > 2), reverse=True))


def pad_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """`x` with zero rows appended up to `size` rows."""
    if x.shape[0] == size:
        return x
    return torch.cat([x, x.new_zeros((size - x.shape[0], *x.shape[1:]))])


def _autocast_state(device: torch.device) -> tuple[bool, torch.dtype | None]:
    on = torch.is_autocast_enabled(device.type)
    return on, (torch.get_autocast_dtype(device.type) if on else None)


@dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph
    static_in: torch.Tensor
    static_out: torch.Tensor


class BucketedGraphs:
    """`fn` (one stack's computation, batch-first) over batches padded up to a bucket: on CUDA, one
    captured CUDA graph per (bucket, input shape and dtype, autocast state), replayed; a batch beyond
    the largest bucket runs in chunks. `graphs=False` runs `fn` eagerly on the padded batch instead
    (how the bucketing is checked without a GPU). A call on another device, or with gradients
    enabled, runs `fn` directly."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], max_batch: int, graphs: bool = True):
        self.fn = fn
        self.buckets = bucket_sizes(max_batch)
        self.graphs = graphs
        self._captured: dict[tuple, _Graph] = {}
        self._inputs: dict[tuple, torch.Tensor] = {}  # one static input per shape and dtype: bucket b uses [:b]
        self._pool: Any = None

    @property
    def captured(self) -> int:
        return len(self._captured)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n, top = x.shape[0], self.buckets[-1]
        if n == 0 or (self.graphs and (not x.is_cuda or torch.is_grad_enabled())):
            return self.fn(x)
        if n > top:
            return torch.cat([self(x[i:i + top]) for i in range(0, n, top)])
        b = bucket_for(n, self.buckets)
        if not self.graphs:
            return self.fn(pad_batch(x, b))[:n]
        key = (b, x.dtype, tuple(x.shape[1:]), x.device, _autocast_state(x.device))
        g = self._captured.get(key)
        if g is None:
            g = self._captured[key] = self._capture(x, b)
        g.static_in[:n].copy_(x)
        if n < b:
            g.static_in[n:].zero_()
        g.graph.replay()
        return g.static_out[:n].clone()  # the next replay (of any bucket: one memory pool) overwrites it

    def _capture(self, x: torch.Tensor, b: int) -> _Graph:
        """Capture `fn` on bucket `b`'s static input, as torch.cuda.graph's documentation asks: warm-up
        calls on a side stream first; autocast's weight cache off (a cached cast would be freed when the
        caller's autocast region ends, under a graph still reading it)."""
        dev = x.device
        ikey = (x.dtype, tuple(x.shape[1:]), dev)
        buf = self._inputs.get(ikey)
        if buf is None:
            with torch.inference_mode(False):  # a plain tensor: writable inside and outside inference mode
                buf = self._inputs[ikey] = torch.zeros((self.buckets[-1], *x.shape[1:]), dtype=x.dtype, device=dev)
        static_in = buf[:b]
        on, dtype = _autocast_state(dev)
        no_cache = (torch.autocast(dev.type, dtype=dtype, cache_enabled=False) if on and dtype is not None
                    else contextlib.nullcontext())
        with torch.cuda.device(dev), no_cache:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                for _ in range(GRAPH_WARMUP_CALLS):
                    self.fn(static_in)
            torch.cuda.current_stream(dev).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):  # other workers' GPUs
                static_out = self.fn(static_in)
        if not isinstance(static_out, torch.Tensor):
            raise TypeError(f"a graphed stack must return one tensor, got {type(static_out).__name__}")
        return _Graph(graph, static_in, static_out)


# ----- what a prepared stack's forward becomes --------------------------------------------------------
def _in_channels_last(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    def channels_last_call(x: torch.Tensor) -> torch.Tensor:
        return fn(x.contiguous(memory_format=torch.channels_last)).contiguous()

    return channels_last_call


class StackForward:
    """A stack's `forward`: the class's own forward [in channels-last] [compiled] [over bucketed CUDA
    graphs], in that order from the inside out."""

    def __init__(self, module: nn.Module, channels_last: bool = False, compiled: bool = False,
                 graph_batch: int | None = None, graphs: bool = True):
        self.module = module
        self.channels_last, self.compiled, self.graph_batch, self.graphs = channels_last, compiled, graph_batch, graphs
        fn: Callable[[torch.Tensor], torch.Tensor] = type(module).forward.__get__(module)  # never a wrapper's
        if channels_last:
            fn = _in_channels_last(fn)
        if compiled:
            fn = torch.compile(fn, dynamic=True)
        self.inner = fn
        self.bucketed = BucketedGraphs(fn, graph_batch, graphs=graphs) if graph_batch else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.bucketed(x) if self.bucketed is not None else self.inner(x)

    def __deepcopy__(self, memo: dict) -> StackForward:
        return StackForward(copy.deepcopy(self.module, memo), self.channels_last, self.compiled, self.graph_batch,
                            self.graphs)


def speed_up_conv_stacks(model: M, channels_last: bool = False, compiled: bool = False,
                         graph_batch: int | None = None, graphs: bool = True) -> M:
    """Give every convolution stack of `model` a `StackForward` with these options, in place (from
    the class's forward: preparing again replaces, never stacks, wrappers); returns `model`. With
    nothing on, the stacks get their class's forward back."""
    for stack in conv_stacks(model):
        m = stack.module
        if channels_last:
            cast(Any, m).to(memory_format=torch.channels_last)  # 4-d weights; (torch's stubs lack the argument)
        if channels_last or compiled or graph_batch:
            m.forward = StackForward(m, channels_last, compiled, graph_batch, graphs)
        else:
            m.__dict__.pop("forward", None)
    return model


def capture_graphs(model: nn.Module, device: str, dtype: str) -> int:
    """Capture the CUDA graphs of every bucket of every stack whose input shape is known, as serving
    calls them (inference mode, `dtype`'s precision; float32 inputs, as the families pass them);
    returns how many graphs the stacks hold."""
    held = 0
    for stack in conv_stacks(model):
        fwd = stack.module.__dict__.get("forward")
        if not isinstance(fwd, StackForward) or fwd.bucketed is None:
            continue
        if stack.sample_shape is not None:
            for b in capture_order(fwd.bucketed.buckets):
                with torch.inference_mode(), precision(device, dtype):
                    stack.module(torch.zeros((b, *stack.sample_shape), device=device))
        held += fwd.bucketed.captured
    return held


# ----- a CPU: every convolution on oneDNN -----------------------------------------------------------------
class OneDNNConv:
    """A `Conv2d`'s forward on a CPU in float32 (autocast off): oneDNN's convolution, the kernel PyTorch
    itself picks for a 3x3 convolution over two or more images. For ONE image PyTorch's heuristic falls
    back to its reference im2col convolution for small inputs (3x3 kernels over at most 20480 values:
    the VQGAN encoder's lowest levels; 1x1 kernels on one thread below 16 images), which on this CPU
    costs about 2.5x as much per layer (the shipped model's encode of one image: 4.7 ms instead of 6.9,
    docs/benchmarks.md) and rounds differently, so an image encoded alone differed (~1e-6) from the
    same image encoded in a batch: continuous batching under light load encodes its arrivals one by
    one. On oneDNN an image's output is bit for bit its row of any batch (tests/test_speed_settings.py).
    Anything else (another device or dtype, autocast, another padding mode) takes the class's forward."""

    def __init__(self, conv: nn.Conv2d):
        self.conv = conv

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        if (x.device.type != "cpu" or x.dtype != torch.float32 or c.weight.dtype != torch.float32
                or torch.is_autocast_enabled("cpu") or not torch.backends.mkldnn.enabled):
            return type(c).forward(c, x)
        return torch.ops.aten.mkldnn_convolution(x, c.weight, c.bias, c.padding, c.stride, c.dilation, c.groups)


def onednn_convolutions(model: M, on: bool) -> M:
    """With `on` (a CPU, not compiled) and oneDNN built in, every plain `Conv2d` of `model` (zero
    padding given as numbers) gets a `OneDNNConv` forward; otherwise each gets its class's forward
    back. In place; returns `model`. Its outputs are the default's to rounding (float32), so a model
    shared as it was loaded may be prepared this way (`Speedups.changes_model` stays False)."""
    on = on and torch.backends.mkldnn.is_available()
    for m in model.modules():
        if type(m) is nn.Conv2d and m.padding_mode == "zeros" and not isinstance(m.padding, str) and on:
            cast(Any, m).forward = OneDNNConv(m)  # on the instance, as a stack's StackForward
        elif isinstance(m, nn.Conv2d):
            m.__dict__.pop("forward", None)
    return model


def check_speedups(sp: Speedups, device: str) -> None:
    """A ValueError naming the setting when `sp` cannot run on `device` (CUDA graphs off CUDA)."""
    if sp.cuda_graphs and torch.device(device).type != "cuda":
        raise ValueError(f"ALIT_CUDA_GRAPHS needs a CUDA device, and this worker's device is {device!r} "
                         "(set ALIT_DEVICES to CUDA devices only, or ALIT_CUDA_GRAPHS=false)")


def prepare_for_device(model: M, device: str, dtype: str = "float32", speedups: Speedups | None = None,
                       max_batch: int = 32) -> M:
    """`model` moved to `device` in eval mode, with `speedups` applied in place (compile.py's scope:
    the transformer blocks' per-token parts with `all`; the stacks: see the module docstring), CUDA
    graphs captured for every bucket up to `max_batch` in `dtype`; returns it. CUDA graphs on a
    device that is not CUDA raise ValueError (start-up stops with the message)."""
    sp = speedups or Speedups()
    check_speedups(sp, device)
    model = model.to(device).eval()
    onednn_convolutions(model, on=torch.device(device).type == "cpu" and sp.compile == "off")  # compiled: own kernels
    if sp.compile == "all":
        compile_blocks(model)
    speed_up_conv_stacks(model, channels_last=sp.channels_last, compiled=sp.compile != "off",
                         graph_batch=max_batch if sp.cuda_graphs else None)
    if sp.cuda_graphs:
        capture_graphs(model, device, dtype)
    return model


# ----- python -m service.model.speed: every setting against the default, on one device ----------------
VARIANTS: dict[str, Speedups] = {
    "default": Speedups(),
    "channels_last": Speedups(channels_last=True),
    "cuda_graphs": Speedups(cuda_graphs=True),
    "compile_vqgan": Speedups(compile="vqgan"),
    "all": Speedups(channels_last=True, compile="vqgan", cuda_graphs=True),
}


def tolerance(dtype: str) -> float:
    """Largest |difference| a setting may make to a stack's output, relative to the output's largest
    magnitude: float32 changes only the order of sums; bfloat16 / float16 round every layer."""
    return 1e-4 if dtype == "float32" else 5e-2


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def compare(model: nn.Module, device: str, dtype: str, variants: list[str], sizes: list[int],
            repeats: int = 10, max_batch: int | None = None,
            report: Callable[[dict], None] | None = None) -> list[dict]:
    """Each variant's stacks against the default's on the same inputs (seeded): the largest
    difference relative to the output's magnitude, the VQGAN code indices that differ (encoder), and
    ms per image at each size (median of `repeats` synchronised calls, after the first). One dict per
    variant, also passed to `report` as soon as it is done."""
    max_batch = max_batch or max(sizes)
    gen = torch.Generator().manual_seed(0)
    stacks = conv_stacks(model)
    if not stacks:
        raise ValueError("this model has no convolution stack (.vqgan or .pixel_decoder)")
    inputs: dict[str, dict[int, torch.Tensor]] = {}
    for s in stacks:
        if s.sample_shape is None:
            raise ValueError(f"{s.name}: its input shape is unknown")
        make = torch.rand if s.name.endswith("encoder") else torch.randn  # pixels in [0, 1]; codes
        inputs[s.name] = {n: make((n, *s.sample_shape), generator=gen).to(device) for n in sizes}
    ref: dict[tuple[str, int], torch.Tensor] = {}
    results = []
    for name in ["default", *[v for v in variants if v != "default"]]:
        sp = VARIANTS[name]
        t0 = time.perf_counter()
        m = prepare_for_device(copy.deepcopy(model), device, dtype, sp, max_batch)
        row: dict[str, Any] = {"variant": name, "settings": sp.describe(), "dtype": dtype, "device": device,
                               "stacks": {}, "ok": True}
        for s in conv_stacks(m):
            if sp.compile != "off":  # compile as the engine's warm-up does: no graph specialised to the sizes timed
                for n in warm_batch_sizes(max_batch):
                    with torch.inference_mode(), precision(device, dtype):
                        s.module(inputs[s.name][max(sizes)][:1].expand(n, *s.sample_shape or ()).contiguous())
                _sync(device)
            per: dict[str, Any] = {}
            for n in sizes:
                x = inputs[s.name][n]
                with torch.inference_mode(), precision(device, dtype):
                    out = s.module(x).float()
                    _sync(device)
                    times = []
                    for _ in range(repeats):
                        t = time.perf_counter()
                        s.module(x)
                        _sync(device)
                        times.append(time.perf_counter() - t)
                entry: dict[str, Any] = {"ms_per_image": 1e3 * statistics.median(times) / n}
                if name == "default":
                    ref[(s.name, n)] = out
                else:
                    r = ref[(s.name, n)]
                    rel = float((out - r).abs().max() / r.abs().max().clamp_min(1e-12))
                    entry["max_rel_diff"] = rel
                    entry["ok"] = bool(torch.isfinite(out).all()) and rel <= tolerance(dtype)
                    row["ok"] &= entry["ok"]
                    vq = getattr(m, "vqgan", None)
                    if s.name == "vqgan.encoder" and isinstance(vq, VQGAN):
                        entry["code_ids_differing"] = int((vq.quantize.indices(out) != vq.quantize.indices(r)).sum())
                per[str(n)] = entry
            row["stacks"][s.name] = per
        row["seconds"] = time.perf_counter() - t0
        del m
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
        results.append(row)
        if report is not None:
            report(row)
    return results


def describe(row: dict) -> str:
    parts = []
    for stack, per in row["stacks"].items():
        cells = []
        for n, e in per.items():
            cell = f"{e['ms_per_image']:.3f} ms/img @{n}"
            if "max_rel_diff" in e:
                cell += f" (diff {e['max_rel_diff']:.1e}"
                cell += f", {e['code_ids_differing']} ids" if "code_ids_differing" in e else ""
                cell += ")"
            cells.append(cell)
        parts.append(f"{stack}: " + ", ".join(cells))
    verdict = "" if row["variant"] == "default" else (" PASS" if row["ok"] else " FAIL")
    return f"{row['variant']:<14} [{row['settings']}]{verdict} in {row['seconds']:.1f} s; " + "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    from .registry import resolve

    p = argparse.ArgumentParser(prog="python -m service.model.speed", description=(
        "Each speed setting (channels-last, compile=vqgan, CUDA graphs, all together) against the default: "
        "the convolution stacks' outputs (exit 1 when one differs beyond the dtype's tolerance) and ms per image."))
    p.add_argument("--model", default="preset:alit_small")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    p.add_argument("--sizes", default="32,7,1", help="batch sizes compared and timed (the first is the max batch)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", help="write the results here (rewritten after every variant)")
    a = p.parse_args(argv)
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    if torch.device(a.device).type != "cuda":
        variants = [v for v in variants if not VARIANTS[v].cuda_graphs]  # refused off CUDA
    sizes = [int(s) for s in a.sizes.split(",")]
    loaded = resolve(a.model)
    print(f"{a.model} ({loaded.family.name}) on {a.device}, {a.dtype}, torch {torch.__version__}; sizes {sizes}; "
          f"tolerance {tolerance(a.dtype):g} of the output's magnitude", flush=True)
    done: list[dict] = []

    def report(row: dict) -> None:
        done.append(row)
        print(describe(row), flush=True)
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"model": a.model, "device": a.device, "dtype": a.dtype, "sizes": sizes,
                           "variants": {n: asdict(VARIANTS[n]) for n in variants}, "results": done}, f, indent=1)

    rows = compare(loaded.model, a.device, a.dtype, variants, sizes, a.repeats, report=report)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
