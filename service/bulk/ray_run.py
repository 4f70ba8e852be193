"""The same pipeline on a Ray cluster (Ray Data), for `--ray [ADDRESS]`.

* Read: one item per input unit (`sources.Unit`: 64 image files, one shard, one Parquet file) goes
  through `map_batches(read_units)`, a task per unit on any node, which reads it with the same
  reader as the local run (so keys, per-image errors and unreadable sources are the same) and emits
  the images' bytes in blocks of `RECORDS_PER_BLOCK`. Ray's own readers are not used: one unreadable
  file fails a whole `read_binary_files` job, and none of them knows WebDataset sample keys,
  Hugging Face image structs or `FILE:ROW` keys as the local run does.
* Tokenize: `map_batches(TokenizeActor)` on a fixed pool of actors, each holding one in-process
  engine on one device (a GPU actor asks for one GPU; a CPU actor for `cpus_per_actor` cores, and
  runs torch with that many threads), spread over the nodes.
* Write: the driver iterates the result and hands every row to the same sink (shards, progress,
  manifest) as the local run, so the output is the same.

The model spec must name weights every node can read (a shared filesystem, the same path on each
node, or a preset); an actor that finds other weights (another fingerprint) refuses to start.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import warnings
from dataclasses import asdict
from typing import Any, cast

from .rows import COLUMNS, error_row, to_table
from .sources import Record, Unit, read_unit
from .work import ImageTokenizer, Plan, load_model

log = logging.getLogger("alit.bulk")
RECORDS_PER_BLOCK = 32
READ_CPUS = 0.25  # a read task is I/O; it should not wait for cores the actors hold
RECORD_FIELDS = ("key", "source", "data", "error", "error_code")


def _unit_item(u: Unit) -> dict[str, str]:
    d = asdict(u)
    d["skip"] = sorted(u.skip)
    return {"unit": json.dumps(d)}


def _unit_of(text: str) -> Unit:
    d = json.loads(text)
    d["items"] = tuple(tuple(x) for x in d["items"])
    d["skip"] = frozenset(d["skip"])
    return Unit(**d)


def read_units(batch):
    """Ray read step: units -> blocks of records (bytes read here, on whichever node runs it)."""
    import pyarrow as pa

    schema = pa.schema([("key", pa.string()), ("source", pa.string()), ("data", pa.binary()),
                        ("error", pa.string()), ("error_code", pa.string())])
    out: list[dict[str, Any]] = []
    for text in batch.column("unit").to_pylist():
        for rec in read_unit(_unit_of(text)):
            rec = rec.loaded()
            out.append({k: getattr(rec, k) for k in RECORD_FIELDS})
            if len(out) >= RECORDS_PER_BLOCK:
                yield pa.Table.from_pylist(out, schema=schema)
                out = []
    if out:
        yield pa.Table.from_pylist(out, schema=schema)


class TokenizeActor:
    """One engine on one device; batches of records in, batches of rows out."""

    def __init__(self, plan: dict[str, Any], devices: str, decode_threads: int, threads: int | None,
                 cache_url: str | None, cache_options: dict[str, Any]):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.plan = Plan(**plan)
        loaded = load_model(self.plan)
        # one loop for the actor's life, on a thread of its own: Ray may call the actor from several
        # threads at once (batches overlap in the engine), and the Redis client is bound to one loop
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="alit-bulk-loop", daemon=True).start()
        cache = None
        if cache_url:
            from ..cache import make_cache

            cache = make_cache(cache_url, **cache_options)
        self.tok = ImageTokenizer(loaded, self.plan, devices, decode_threads, cache)

    async def _row(self, rec: Record) -> dict[str, Any]:
        if rec.unreadable:  # passed through for the driver's summary
            return error_row(self.plan.base, rec.source, None, rec.error_code or "unreadable_source", rec.error or "")
        return await self.tok.row(rec)

    async def _rows(self, recs: list[Record]) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(self._row(r) for r in recs)))

    def __call__(self, batch):
        recs = [Record(**row) for row in batch.to_pylist()]
        return to_table(asyncio.run_coroutine_threadsafe(self._rows(recs), self.loop).result())

    def __del__(self):
        tok = getattr(self, "tok", None)
        if tok is not None:
            tok.close()


class RayResources(ValueError):
    """The actors asked for cannot run on the cluster beside the read tasks (it would wait forever)."""


def check_fits(ray, gpu: bool, actors: int, cpus_per_actor: float) -> None:
    """Ray starts an actor pool only once all its actors have their resources, and the read tasks need
    a share of a core besides: a pool that leaves none would wait forever, so refuse it here."""
    res = ray.cluster_resources()
    if gpu:
        if actors > res.get("GPU", 0):
            raise RayResources(f"--ray-actors {actors} GPU actors, but the cluster has {res.get('GPU', 0):g} GPUs")
        return
    cpus = float(res.get("CPU", 0))
    if actors * cpus_per_actor + READ_CPUS > cpus:
        raise RayResources(f"--ray-actors {actors} x --ray-cpus-per-actor {cpus_per_actor:g} CPUs plus {READ_CPUS:g} "
                           f"for reading exceed the cluster's {cpus:g} CPUs; use fewer actors or fewer CPUs each")


def cluster_actors(ray, gpu: bool, cpus_per_actor: float) -> int:
    """Default pool size: a GPU actor per GPU; else as many CPU actors as the cluster's cores allow,
    leaving a core for the read tasks when there are several."""
    res = ray.cluster_resources()
    if gpu:
        return max(1, int(res.get("GPU", 0)))
    cpus = float(res.get("CPU", 1))
    spare = 1.0 if cpus > 2 else READ_CPUS
    return max(1, int((cpus - spare) // cpus_per_actor))


def run_ray(address: str | None, plan: Plan, units: list[Unit], sink, devices: str, actors: int | None,
            cpus_per_actor: float, batch_size: int, decode_threads: int, cache_url: str | None = None,
            cache_options: dict | None = None) -> dict:
    """Tokenize `units` on a Ray cluster (`address`: an existing cluster, "auto", or None: start a
    local one); rows and unreadable sources go to `sink` on this process. Facts for the manifest."""
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address or None, include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=False, configure_logging=False)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning, module="ray")  # Ray's own, about itself
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = False  # ours counts rows as they are written
            ctx.print_on_execution_start = False
            logging.getLogger("ray.data").setLevel(logging.ERROR)  # its notices would tear the progress bar
            gpu = devices.strip().lower().startswith("cuda") or (
                devices.strip().lower() == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
            n = actors or cluster_actors(ray, gpu, cpus_per_actor)
            check_fits(ray, gpu, n, cpus_per_actor)
            actor_args = {"plan": plan.to_dict(), "devices": "cuda:0" if gpu else "cpu",  # Ray picks the GPU
                          "decode_threads": decode_threads, "threads": None if gpu else max(1, int(cpus_per_actor)),
                          "cache_url": cache_url, "cache_options": cache_options or {}}
            items = ray.data.from_items([_unit_item(u) for u in units], override_num_blocks=max(1, len(units)))
            ds = items.map_batches(read_units, batch_size=1, batch_format="pyarrow", num_cpus=READ_CPUS)
            ds = ds.map_batches(TokenizeActor, batch_size=batch_size, batch_format="pyarrow",
                                compute=ray.data.ActorPoolStrategy(size=n), fn_constructor_kwargs=actor_args,
                                num_gpus=1 if gpu else 0, num_cpus=0 if gpu else cpus_per_actor)  # spread over nodes
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                for row in cast(Any, batch).select(list(COLUMNS)).to_pylist():
                    if row["key"] is None:
                        sink.unreadable(Record(None, row["source"], error=row["error"], error_code=row["error_code"]))
                    else:
                        sink.row(row)
            nodes = [node for node in ray.nodes() if node.get("Alive")]
        return {"ray": {"address": address, "actors": n, "gpu_actors": gpu, "cpus_per_actor": None if gpu
                        else cpus_per_actor, "cluster_nodes": len(nodes), "batch_size": batch_size}}
    finally:
        if started_here:
            ray.shutdown()
