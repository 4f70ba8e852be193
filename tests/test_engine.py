"""The engine: per-image halting under continuous batching gives exactly the single-image answer."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch

from service.engine import (
    DeadlineExceeded,
    Engine,
    EngineSettings,
    EngineStopped,
    QueueFull,
    StepFailed,
    Target,
)
from service.engine.runner import ItemFailed, split_run
from service.model.alit import ALITLimits, quality
from service.model.checkpoint import LoadedModel, load_model

THR = 0.8775  # the fixture's encode threshold: images stop at iterations 1, 2 and 3


@pytest.fixture(scope="module")
def loaded(fixture_dir) -> LoadedModel:
    return load_model(fixture_dir / "checkpoint.pth")


def alone(model, image, target: Target, halting: bool):
    """What the model gives this image alone: (selected iteration, ids, l1, met)."""
    states = model.prepare(image[None])
    best = first = None
    cap = len(target.ladder(ALITLimits(32, 8)))
    for n in range(1, cap + 1):
        out = model.advance(states, halting=halting)[0]
        if not target.needs_quality:
            continue
        logits = out.logits[None] if halting else model.decode_logits([out.token_ids])
        l1, psnr = (float(v[0]) for v in quality(model.reconstruct(logits), image[None]))
        rec = (n, out.token_ids.numpy(), l1, psnr)
        if best is None or target.better(l1, psnr, best[2], best[3]):
            best = rec
        if target.met(l1, psnr):
            first = rec
            break
    if not target.needs_quality:
        return cap, out.token_ids.numpy(), None, True
    chosen = first or best
    return chosen[0], chosen[1], chosen[2], first is not None


TARGETS = [Target(max_l1=THR), Target(tokens=96), Target(min_psnr=3.0), Target(max_l1=0.3, max_tokens=128),
           Target(max_l1=THR, min_psnr=1.0), Target(tokens=256)]


def run(coro):
    return asyncio.run(coro)


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("halting", [False, True])
@pytest.mark.parametrize("mode", ["cohort", "padded", "packed+compile"])
def test_concurrent_mixed_targets_equal_single_image_results(loaded, images, halting, mode):
    """Packed (the default) is covered by the batching and halting-selection tests; here also packed
    under torch.compile (ALIT_COMPILE), against the plain model's single-image answers."""
    jobs = [(i % 7, TARGETS[i % len(TARGETS)]) for i in range(30)]
    batch_mode, compiled = mode.split("+")[0], mode.endswith("+compile")

    async def go():
        eng = Engine(loaded, EngineSettings(devices="cpu", halting=halting, batch_mode=batch_mode, max_batch=8,
                                            compile=compiled)).start()
        if compiled:
            assert eng.workers[0].runner.model is not loaded.model  # compiled on a copy, not in place
        graphs = compiled_graphs()
        try:
            tasks = []
            for b, t in jobs:  # staggered arrivals: images join at different iterations
                tasks.append(asyncio.create_task(eng.tokenize(images[b], t)))
                await asyncio.sleep(0.002)
            out = await asyncio.gather(*tasks)
        finally:
            eng.shutdown()
        # the warm-up compiled every graph serving needs: batches of every size came and went
        assert compiled_graphs() == graphs, "torch.compile compiled while serving"
        return out

    results = run(go())
    seen_iters = set()
    for (b, t), r in zip(jobs, results):
        it, ids, l1, met = alone(loaded.model, images[b], t, halting)
        assert r.selected_iteration == it, (b, t)
        np.testing.assert_array_equal(r.token_ids, ids)
        assert r.target_met == met
        if l1 is not None:
            assert abs(r.l1 - l1) <= 1e-5
        assert r.num_tokens == 32 * it
        seen_iters.add(r.selected_iteration)
    assert len(seen_iters) >= 3  # halting really varied per image


def test_tokens_target_never_decodes_pixels(loaded, images):
    async def go():
        eng = Engine(loaded, EngineSettings(devices="cpu", halting=False, warmup=False)).start()
        try:
            r = await asyncio.gather(*[eng.tokenize(images[i], Target(tokens=128)) for i in range(7)])
            return r, eng.pixel_decodes
        finally:
            eng.shutdown()

    results, decodes = run(go())
    assert decodes == 0 and all(r.pixel_decodes == 0 and r.l1 is None for r in results)


def test_reference_and_lockstep_policies_agree_with_continuous(loaded, images):
    async def go(policy):
        eng = Engine(loaded, EngineSettings(devices="cpu", policy=policy, halting=False, warmup=False)).start()
        try:
            return await asyncio.gather(*[eng.tokenize(images[i], Target(max_l1=THR)) for i in range(7)])
        finally:
            eng.shutdown()

    base = run(go("continuous"))
    for policy in ("lockstep", "reference"):
        other = run(go(policy))
        for a, b in zip(base, other):
            assert a.selected_iteration == b.selected_iteration
            np.testing.assert_array_equal(a.token_ids, b.token_ids)
    assert all(r.pixel_decodes == 8 for r in other)  # reference: every iteration decoded


def test_queue_full_is_typed_with_retry_after_and_loses_nothing(loaded, images):
    async def go():
        eng = Engine(loaded, EngineSettings(devices="cpu", max_queue=4, max_batch=2, warmup=False)).start()
        try:
            tasks = [asyncio.create_task(eng.tokenize(images[i % 7], Target(tokens=256))) for i in range(12)]
            out = await asyncio.gather(*tasks, return_exceptions=True)
            return out
        finally:
            eng.shutdown()

    out = run(go())
    rejected = [o for o in out if isinstance(o, QueueFull)]
    served = [o for o in out if not isinstance(o, Exception)]
    assert rejected and served and len(rejected) + len(served) == 12
    assert all(r.retry_after >= 1 for r in rejected)
    assert all(r.num_tokens == 256 for r in served)


def test_deadline_expiry_is_typed_and_spares_others(loaded, images):
    async def go():
        eng = Engine(loaded, EngineSettings(devices="cpu", max_batch=1, warmup=False)).start()
        try:
            slow = asyncio.create_task(eng.tokenize(images[0], Target(tokens=256)))
            await asyncio.sleep(0)
            doomed = asyncio.create_task(eng.tokenize(images[1], Target(tokens=256), deadline=time.monotonic() + 0.01))
            fine = asyncio.create_task(eng.tokenize(images[2], Target(tokens=64)))
            return await asyncio.gather(slow, doomed, fine, return_exceptions=True)
        finally:
            eng.shutdown()

    slow, doomed, fine = run(go())
    assert isinstance(doomed, DeadlineExceeded) and "deadline passed" in str(doomed)
    assert slow.num_tokens == 256 and fine.num_tokens == 64


def test_failing_step_fails_only_its_images(loaded, images):
    async def go():
        eng = Engine(loaded, EngineSettings(devices="cpu", warmup=False)).start()

        def hook(jobs):
            if any(j.tag == "boom" for j in jobs):
                raise RuntimeError("injected fault")

        eng.set_fault_hook(hook)
        try:
            bad = await asyncio.gather(eng.tokenize(images[0], Target(tokens=64), tag="boom"),
                                       return_exceptions=True)
            good = await asyncio.gather(*[eng.tokenize(images[i], Target(tokens=64)) for i in range(3)])
            return bad[0], good, eng.ready
        finally:
            eng.shutdown()

    bad, good, ready = run(go())
    assert isinstance(bad, StepFailed) and "injected fault" in str(bad)
    assert [g.num_tokens for g in good] == [64, 64, 64] and ready


@pytest.mark.parametrize("halting", [True, False])
def test_a_poison_image_fails_alone_and_its_batch_mates_get_their_results(loaded, images, halting):
    """A model call that raises is retried on halves until the image that causes it is alone: it
    fails; the seven images it shared steps with finish exactly as they would have without it."""
    targets = [Target(tokens=96), Target(max_l1=0.3), Target(min_psnr=5.0), Target(tokens=256)]

    async def go(poison: bool):
        eng = Engine(loaded, EngineSettings(devices="cpu", warmup=False, halting=halting)).start()
        calls = []

        def hook(jobs):
            calls.append(len(jobs))
            if any(j.tag == "poison" for j in jobs) and len(calls) > 2:  # fails from its second step on
                raise RuntimeError("poison pixels")

        eng.set_fault_hook(hook)
        try:
            with eng.queue._cv:  # the worker takes nothing until all eight are queued (the lock is re-entrant)
                jobs = [asyncio.ensure_future(eng.tokenize(images[i % len(images)], targets[i % 4],
                                                           tag="poison" if poison and i == 3 else None))
                        for i in range(8)]
                while len(eng.queue) < 8:
                    await asyncio.sleep(0)
            return await asyncio.gather(*jobs, return_exceptions=True), max(calls)
        finally:
            eng.shutdown()

    got, widest = run(go(poison=True))
    want, _ = run(go(poison=False))
    assert widest == 8  # they really shared calls
    assert isinstance(got[3], StepFailed) and "poison pixels" in str(got[3])
    for i in (0, 1, 2, 4, 5, 6, 7):
        assert not isinstance(got[i], BaseException), got[i]
        np.testing.assert_array_equal(got[i].token_ids, want[i].token_ids)
        assert got[i].iterations == want[i].iterations and got[i].l1 == want[i].l1


def test_cancelled_request_frees_its_slot(loaded, images):
    async def go():
        eng = Engine(loaded, EngineSettings(devices="cpu", warmup=False)).start()
        try:
            t = asyncio.create_task(eng.tokenize(images[0], Target(max_l1=1e-9)))
            await asyncio.sleep(0.05)
            t.cancel()
            await asyncio.sleep(0.2)
            return eng.workers[0].load, t.cancelled()
        finally:
            eng.shutdown()

    load, cancelled = run(go())
    assert cancelled and load == 0


def test_draining_engine_refuses_new_work(loaded, images):
    async def go():
        eng = Engine(loaded, EngineSettings(devices="cpu", warmup=False)).start()
        try:
            first = asyncio.create_task(eng.tokenize(images[0], Target(tokens=256)))
            await asyncio.sleep(0.01)
            drained = asyncio.create_task(eng.drain(30))
            await asyncio.sleep(0)
            with pytest.raises(EngineStopped):
                await eng.tokenize(images[1], Target(tokens=32))
            return (await first).num_tokens, await drained
        finally:
            eng.shutdown()

    assert run(go()) == (256, True)


def test_reconstruct_equals_model_decode(loaded, images):
    ids = [np.arange(64) % 256, (np.arange(128) * 7) % 256]

    async def go():
        eng = Engine(loaded, EngineSettings(devices="cpu", warmup=False)).start()
        try:
            return await eng.reconstruct(ids)
        finally:
            eng.shutdown()

    pixels = run(go())
    for seq, px in zip(ids, pixels):
        want = loaded.model.reconstruct_ids([torch.as_tensor(seq)])[0].clamp(0, 1)
        assert torch.allclose(px, want, atol=1e-5)


def test_split_run_halves_until_it_fits():
    calls = []

    def fn(items):
        calls.append(len(items))
        if len(items) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return [x * 2 for x in items]

    assert split_run(fn, list(range(7))) == [x * 2 for x in range(7)]
    assert calls[0] == 7 and max(calls[1:]) <= 4


def test_split_run_isolates_the_item_that_fails():
    def fn(items):
        if 5 in items:
            raise ValueError("poison")
        return [x * 2 for x in items]

    out = split_run(fn, list(range(8)))
    assert [o for i, o in enumerate(out) if i != 5] == [x * 2 for x in range(8) if x != 5]
    assert isinstance(out[5], ItemFailed) and str(out[5].error) == "poison"
