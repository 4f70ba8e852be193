"""The in-process pipeline: one reader thread walks the input, decode threads turn bytes into model
inputs, the engine tokenizes them on every local device with continuous batching, and each row
goes to the sink the moment its image is done.

Memory is bounded by the window: at most `window` images are between being read and being
written (bytes, pixels or in the engine), however large the dataset.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from ..cache import make_cache
from ..model.checkpoint import LoadedModel
from .sources import Unit, records
from .work import ImageTokenizer, Plan


async def pump(tok: ImageTokenizer, units: list[Unit], window: int, sink) -> None:
    """Every record of `units` through `tok`, at most `window` in flight; rows and unreadable
    sources to `sink` as they come. An engine failure stops the run (it is raised here)."""
    loop = asyncio.get_running_loop()
    slots = asyncio.Semaphore(window)
    reader = ThreadPoolExecutor(1, thread_name_prefix="alit-bulk-read")
    it = records(units)
    pending: set[asyncio.Task] = set()
    failed: list[BaseException] = []

    async def one(rec) -> None:
        try:
            sink.row(await tok.row(rec))
        except BaseException as e:
            failed.append(e)
            raise
        finally:
            slots.release()

    try:
        while not failed:
            await slots.acquire()
            rec = await loop.run_in_executor(reader, next, it, None)
            if rec is None:
                break
            if rec.unreadable:
                sink.unreadable(rec)
                slots.release()
                continue
            task = asyncio.create_task(one(rec))
            pending.add(task)
            task.add_done_callback(pending.discard)
        await asyncio.gather(*pending)
    finally:
        for task in pending:
            task.cancel()
        reader.shutdown(wait=False, cancel_futures=True)


def run_local(loaded: LoadedModel, plan: Plan, units: list[Unit], sink, devices: str, window: int,
              decode_threads: int, cache_url: str | None = None, cache_options: dict | None = None) -> dict:
    """Tokenize `units` in this process; returns facts for the manifest (workers, cached)."""
    cache = make_cache(cache_url, **(cache_options or {})) if cache_url else None
    tok = ImageTokenizer(loaded, plan, devices, decode_threads, cache)  # workers started and warm
    sink.start()

    async def main() -> None:
        try:
            await pump(tok, units, window, sink)
        finally:
            if cache is not None:
                await cache.close()

    try:
        asyncio.run(main())
    finally:
        tok.close()
    facts: dict = {"workers": [w.device for w in tok.engine.workers]}
    if cache is not None:
        facts.update({"cached": tok.cached, "cache_errors": tok.cache_errors})
    return facts
