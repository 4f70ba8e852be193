"""Tokenizing whole datasets (`alit-serve tokenize-dataset`, `tokenize_dataset()`): image folders,
lists of paths, WebDataset shards or Parquet files in; Parquet shards with one row per image, a
manifest and a histogram of tokens per image out. In this process (`local.py`) or on a Ray cluster
(`ray_run.py`), resumable, with the API's exact preprocessing and the engine's halting.

Bulk sits beside the API: it uses the model, the engine, `imaging.py` and the cache, never `api/`.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ..engine import Target, TargetError, parse_target
from ..settings import Settings, engine_settings, model_id
from . import shards
from .report import Sink, token_summary, write_histogram
from .shards import OutputError, ShardWriter
from .sources import SourceError, open_source
from .work import Plan

__all__ = ["BulkError", "RunFailed", "Summary", "tokenize_dataset"]


class BulkError(ValueError):
    """The run cannot start (source, OUT, model, target or options): a one-line usage error."""


class RunFailed(RuntimeError):
    """The run stopped part way (the engine failed); complete shards stay, `--resume` continues."""


@dataclass
class Summary:
    out: str
    counts: dict[str, Any]
    unreadable_sources: list[dict[str, str]]
    wall_s: float  # the whole call: model load, engine start-up and warm-up included
    tokenize_s: float  # from the engine being ready (local) or the Ray job starting, to the last row
    images_per_s: float  # this run's images / tokenize_s
    tokens: dict[str, Any]
    shards: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0: every image has tokens; 1: some image (or a whole shard / Parquet file) failed."""
        return 1 if self.counts["failed"] or self.unreadable_sources else 0

    def line(self) -> str:
        c = self.counts
        text = (f"{c['this_run']} images in {self.tokenize_s:.1f} s ({self.images_per_s:.1f} img/s; "
                f"{self.wall_s:.1f} s with start-up); "
                f"{self.out}: {c['rows']} rows, {c['ok']} ok, {c['failed']} failed")
        if c["from_earlier_runs"]:
            text += f" ({c['from_earlier_runs']} from earlier runs)"
        if "mean" in self.tokens:
            text += f"; mean tokens {self.tokens['mean']:.1f}"
        if self.unreadable_sources:
            text += "; unreadable: " + ", ".join(u["path"] for u in self.unreadable_sources)
        return text


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _load(spec: str, settings: Settings):
    from ..model.registry import resolve

    try:
        return resolve(spec, heads=settings.heads)
    except Exception as e:  # a missing file, weights of no known family, a bad preset: all one line
        raise BulkError(f"cannot load the model {spec}: {e}") from None


def tokenize_dataset(src: str | os.PathLike, out: str | os.PathLike, *, model: str | None = None,
                     max_l1: float | None = None, min_psnr: float | None = None, tokens: int | None = None,
                     max_tokens: int | None = None, devices: str | None = None, resume: bool = False,
                     overwrite: bool = False, image_column: str = "image", key_column: str | None = None,
                     shard_rows: int = 1000, window: int | None = None, decode_threads: int | None = None,
                     ray: bool | str = False, ray_actors: int | None = None, ray_cpus_per_actor: float = 1.0,
                     ray_batch_size: int = 16, cache: str | None = None, quiet: bool = False,
                     settings: Settings | None = None) -> Summary:
    """Tokenize every image of `src` into Parquet shards under `out` (see README "Tokenizing datasets").

    `model`: a spec as `ALIT_MODEL` takes it (default: the service's default model); the target
    fields as `POST /v1/tokenize` takes them (none: the service's default target); `devices` as
    `ALIT_DEVICES`; `ray`: True (a local Ray, or `RAY_ADDRESS`) or a cluster address. Everything
    else comes from `settings` (default: the `ALIT_*` environment), as for the service.
    Raises BulkError before any work for what cannot be used, RunFailed when the engine fails."""
    started, t0 = _now(), time.monotonic()
    settings = settings or Settings()
    if shard_rows < 1 or (window is not None and window < 1) or ray_batch_size < 1 or ray_cpus_per_actor <= 0:
        raise BulkError("--shard-rows, --window and --ray-batch-size must be >= 1, --ray-cpus-per-actor > 0")
    out = Path(out)
    try:
        source = open_source(src, image_column, key_column)
        shards.check_writable(out)
        existing = [p for p in out.iterdir() if not p.name.startswith(shards.TEMP_PREFIX)]
        if existing and not resume and not overwrite:
            raise OutputError(f"{out} is not empty; use --resume to continue the run there, or --overwrite")
    except (SourceError, OutputError) as e:
        raise BulkError(str(e)) from None

    served_id, spec = settings.model_specs()[0]
    spec = model or spec
    loaded = _load(spec, settings)
    fields = {"max_l1": max_l1, "min_psnr": min_psnr, "tokens": tokens, "max_tokens": max_tokens}
    try:
        target = parse_target(fields, loaded.limits, Target(max_l1=settings.default_max_l1))
    except TargetError as e:
        raise BulkError(str(e)) from None
    devices = devices or settings.devices
    workers = 1  # engines per process: a Ray actor holds one device
    if not ray:
        from ..engine.workers import resolve_devices

        try:
            workers = len(resolve_devices(devices))
        except ValueError as e:
            raise BulkError(str(e)) from None
        if settings.torch_threads:  # as the service applies ALIT_TORCH_THREADS
            import torch

            torch.set_num_threads(settings.torch_threads)
    eng = asdict(engine_settings(settings, devices))
    eng.pop("devices")
    window = window or 4 * settings.max_batch * max(1, workers)
    eng["max_queue"] = max(eng["max_queue"], window, ray_batch_size)
    plan = Plan(model_spec=spec, model_id=(None if model else served_id) or model_id(loaded), family=loaded.family.name,
                fingerprint=loaded.fingerprint, target=target.to_dict(), decode_scale=settings.decode_scale,
                max_image_bytes=settings.max_image_bytes, max_image_pixels=settings.max_image_pixels,
                halting=settings.halting, retry_stricter=settings.retry_stricter, heads=settings.heads, engine=eng)
    loaded.model.retry_stricter = plan.retry_stricter

    done: dict[str | None, set[str]] = {}
    prior: list[dict[str, Any]] = []
    first = 0
    runs: list[dict[str, Any]] = []
    try:
        if resume:
            done, prior, first, runs = _resume(out, plan)
        elif overwrite:
            shards.clear(out)
        shards.clean_temporary(out)
    except OutputError as e:
        raise BulkError(str(e)) from None

    units = [replace(u, max_bytes=plan.max_image_bytes) for u in source.units(done)]
    decode_threads = decode_threads or _default_decode_threads()
    total = source.total()
    remaining = None if total is None else max(0, total - len(prior))
    run: dict[str, Any] = {
        "started_at": started, "mode": "ray" if ray else "local", "devices": devices, "window": None if ray else window,
        "decode_threads": decode_threads, "shard_rows": shard_rows,
        "resumed": resume and bool(prior),
        "cache": _redact(cache) if cache else None,
    }
    manifest: dict[str, Any] = {"tool": "alit-serve tokenize-dataset", "format": 1, "status": "running",
                                "inputs": source.describe(), "model": {"id": plan.model_id, "spec": spec,
                                "family": plan.family, "fingerprint": plan.fingerprint},
                                "target": plan.target, "plan": plan.to_dict(), "runs": [*runs, run]}
    shards.write_json(out / shards.MANIFEST, manifest)

    sink = Sink(ShardWriter(out, shard_rows, first), remaining, quiet, prior)
    t_run = time.monotonic()
    cache_options = {"prefix": settings.cache_prefix, "ttl_s": settings.cache_ttl_s}
    status, failure = "complete", None
    try:
        if not units:
            facts: dict[str, Any] = {}
        elif ray:
            from .ray_run import RayResources, run_ray

            try:
                facts = run_ray(ray if isinstance(ray, str) else None, plan, units, sink, devices, ray_actors,
                                ray_cpus_per_actor, ray_batch_size, decode_threads, cache,
                                cache_options)
            except RayResources as e:
                status = "refused"
                raise BulkError(str(e)) from None
        else:
            from .local import run_local

            facts = run_local(loaded, plan, units, sink, devices, window, decode_threads,
                              cache, cache_options)
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    except BulkError:  # refused before any image ran (e.g. a Ray pool that cannot fit)
        raise
    except Exception as e:
        status, failure = "failed", f"{type(e).__name__}: {e}"
        raise RunFailed(f"the run stopped: {_root_cause(e)}; complete shards are kept, --resume continues") from e
    finally:
        sink.close()  # the rows already done become a shard: a resumed run need not redo them
        run_s = time.monotonic() - max(t_run, sink.started)
        run.update(facts if status == "complete" else {})
        summary = _finish(out, manifest, run, sink, status, failure, run_s, time.monotonic() - t0,
                          loaded.limits.max_tokens)
    return summary


def _root_cause(e: BaseException) -> str:
    """A failure in one line: the innermost exception of our own (a Ray error wraps the actor's in
    a remote traceback; Ray's own messages end with the remote error's line). The manifest keeps
    the whole text."""
    chain: list[BaseException] = []
    cur: object = e
    while isinstance(cur, BaseException) and all(cur is not c for c in chain) and len(chain) < 20:
        chain.append(cur)
        cur = getattr(cur, "cause", None) or cur.__cause__ or cur.__context__
    own = [c for c in chain if not type(c).__module__.startswith("ray")]
    said = [c for c in chain if str(c).strip()] or chain
    inner = own[-1] if own else said[-1]
    lines = [ln.strip() for ln in str(inner).splitlines() if ln.strip()]
    if own:
        return f"{type(inner).__name__}: {lines[0] if lines else ''}"
    return lines[-1] if lines else type(inner).__name__


def _default_decode_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _resume(out: Path, plan: Plan):
    """What an earlier run in OUT did, refused when it wrote other rows (model, target, decoding)."""
    manifest = shards.read_manifest(out)
    paths = shards.shard_paths(out)
    if manifest is None:
        if paths:
            raise OutputError(f"{out} holds shards but no {shards.MANIFEST}: not a run to resume (use --overwrite)")
        return {}, [], 0, []
    before = manifest.get("plan", {})
    old = Plan(**before) if before else None
    if old is None:
        raise OutputError(f"{out}/{shards.MANIFEST} names no plan: not a run to resume (use --overwrite)")
    for k, v in plan.identity().items():
        was = old.identity()[k]
        if was != v:
            if k == "fingerprint":
                what, was, v = "model", f"{old.model_spec} {str(was)[:16]}", f"{plan.model_spec} {str(v)[:16]}"
            else:
                what = k
            raise OutputError(f"cannot resume {out}: it was written with another {what} ({was}; now {v}); "
                              "use another OUT or --overwrite")
    done, prior, first = shards.read_done(out)
    return done, prior, first, list(manifest.get("runs", []))


def _finish(out: Path, manifest: dict[str, Any], run: dict[str, Any], sink: Sink, status: str, failure: str | None,
            run_s: float, wall_s: float, max_tokens: int) -> Summary:
    counts = sink.counts()
    tokens = sink.tokens()
    ips = counts["this_run"] / run_s if run_s > 0 else 0.0
    run.update({"finished_at": _now(), "status": status, "images": counts["this_run"], "wall_s": round(wall_s, 3),
                "tokenize_s": round(run_s, 3), "images_per_s": round(ips, 3), "shards_written": sink.writer.written})
    if failure:
        run["error"] = failure
    summary_tokens = token_summary(tokens)
    manifest.update({"status": status, "counts": counts, "unreadable_sources": sink.unreadable_sources,
                     "tokens": summary_tokens, "wall_s": round(wall_s, 3), "images_per_s": round(ips, 3),
                     "shards": [p.name for p in shards.shard_paths(out)]})
    if status == "complete":
        why_not = write_histogram(out, tokens, f"{manifest['model']['id']}, target {json.dumps(manifest['target'])}: "
                                  f"{len(tokens)} images", max_tokens)
        manifest["histogram"] = None if why_not else shards.HISTOGRAM
        if why_not:
            manifest["histogram_missing"] = why_not
    shards.write_json(out / shards.MANIFEST, manifest)
    return Summary(str(out), counts, sink.unreadable_sources, wall_s, run_s, ips, summary_tokens, manifest["shards"])
