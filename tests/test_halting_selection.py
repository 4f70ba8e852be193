"""One halting-selection rule: whatever iterations the cache holds, its answer for a target is the
engine's answer, or no answer at all (then the request goes to the engine).

The engine side is the real thing: a real in-process `Engine` running the `preset:test_tiny` ALIT
model, and the One-D-Piece fixture (the `titok` family: probes are prefix lengths, and an exact
budget may be any length, on the ladder or not), on random images. Hypothesis picks the images, the
target that filled the cache (the cache holds exactly the probes that request ran) and the target
asked afterwards.
"""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ODP_FIXTURE
from service.cache import Trajectory
from service.engine import Engine, EngineSettings, Target, TargetError, parse_target
from service.model.registry import resolve

N_IMAGES = 6
DEFAULT = Target(max_l1=0.07)


class World:
    """A started engine and, per image, its full trajectory: every probe of the ladder, and of every
    budget the targets below may ask for, measured."""

    def __init__(self, spec: str, halting: bool):
        self.loop = asyncio.new_event_loop()
        loaded = resolve(spec)
        self.engine = Engine(loaded, EngineSettings(devices="cpu", warmup=False, halting=halting, max_batch=8)).start()
        self.limits = self.engine.limits
        gen = torch.Generator().manual_seed(0)
        size = self.limits.img_size
        # noise, smooth gradients and flat patches: trajectories of different shapes
        self.images = []
        for k in range(N_IMAGES):
            if k % 3 == 0:
                img = torch.rand(3, size, size, generator=gen)
            elif k % 3 == 1:
                ramp = torch.linspace(0, 1, size)
                img = torch.stack([ramp[None, :].expand(size, size), ramp[:, None].expand(size, size),
                                   torch.full((size, size), float(torch.rand(1, generator=gen)))])
            else:
                img = torch.rand(3, 1, 1, generator=gen).expand(3, size, size).clone()
            self.images.append((img * 255).round() / 255)
        never = Target(max_l1=1e-9)  # runs every probe of the ladder, measuring each
        self.full = [Trajectory().merge(self.tokenize(i, never).trajectory) for i in range(N_IMAGES)]
        # exact budgets: the ladder's lengths and, where the model takes them, a few off it
        self.ladder = sorted(len(r.token_ids) for r in self.full[0].records.values())
        self.budgets = sorted({*self.ladder} | {b for b in (1, 5, 24, 40) if self._takes(b)})
        for full, i in zip(self.full, range(N_IMAGES)):
            for b in self.budgets:
                capped = parse_target({"max_l1": 1e-9, "max_tokens": b}, self.limits, DEFAULT)  # measures b too
                full.merge(self.tokenize(i, capped).trajectory)

    def _takes(self, budget: int) -> bool:
        try:
            self.limits.check_budget("tokens", budget)
            return True
        except TargetError:
            return False

    def tokenize(self, i: int, target: Target):
        return self.loop.run_until_complete(self.engine.tokenize(self.images[i], target, trajectory=True))

    def close(self) -> None:
        self.engine.shutdown()
        self.loop.close()


@pytest.fixture(scope="module", params=[("preset:test_tiny", True), ("preset:test_tiny", False),
                                        (str(ODP_FIXTURE), False)], ids=["alit-halting", "alit", "one-d-piece"])
def world(request):
    w = World(*request.param)
    yield w
    w.close()


@st.composite
def targets(draw, world: World, image: int):
    """Valid targets, with thresholds often exactly at (or next to) a value of the image's trajectory."""
    traj = [r for r in world.full[image].records.values() if r.l1 is not None]
    l1s = [r.l1 for r in traj]
    psnrs = [r.psnr for r in traj]

    def near(values, lo, hi):
        v = draw(st.sampled_from(values))
        v = draw(st.sampled_from([v, math.nextafter(v, -math.inf), math.nextafter(v, math.inf),
                                  v * draw(st.floats(0.9, 1.1))]))
        return min(max(v, lo), hi)

    spec = {}
    kind = draw(st.sampled_from(["max_l1", "min_psnr", "both", "tokens", "default"]))
    if kind in ("max_l1", "both"):
        spec["max_l1"] = near(l1s, 1e-6, 1.0)
    if kind in ("min_psnr", "both"):
        spec["min_psnr"] = near(psnrs, 1e-3, 100.0)
    if kind == "tokens":
        spec["tokens"] = draw(st.sampled_from(world.budgets))
    elif draw(st.booleans()):
        spec["max_tokens"] = draw(st.sampled_from(world.budgets))
    try:
        return parse_target(spec, world.limits, DEFAULT)
    except TargetError:  # e.g. a threshold clamped onto an open bound
        return DEFAULT


@st.composite
def cases(draw, world: World):
    image = draw(st.integers(0, N_IMAGES - 1))
    return image, draw(targets(world, image)), draw(targets(world, image))


def _same(answer, result) -> None:
    assert answer.record.iteration == result.selected_iteration
    assert answer.iterations == result.iterations
    assert answer.target_met == result.target_met
    np.testing.assert_array_equal(answer.record.token_ids, result.token_ids)
    if result.l1 is not None:  # measured (a token budget measures nothing; a stored record may have it)
        assert answer.record.l1 == result.l1 and answer.record.psnr == result.psnr


def test_the_cache_answers_exactly_as_the_engine(world):
    @settings(max_examples=60, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(cases(world))
    def check(case):
        image, first, second = case
        # the cache holds what the first request ran (its trajectory), through the binary format
        stored = Trajectory.from_bytes(Trajectory().merge(world.tokenize(image, first).trajectory).to_bytes())
        engine = world.tokenize(image, second)
        answer = stored.lookup(second, world.limits)
        if answer is not None:  # a hit must be exactly the engine's answer
            _same(answer, engine)
        # with every iteration stored, there is always an answer, and it is the engine's
        full = Trajectory.from_bytes(world.full[image].to_bytes())
        answer = full.lookup(second, world.limits)
        assert answer is not None
        _same(answer, engine)

    check()


def test_a_prefix_answers_what_it_determines(world):
    """The iterations a request ran determine its own answer: looking it up again is a hit."""
    keys = world.limits.ladder(None, None, None, None)
    for image in range(N_IMAGES):
        measured = world.full[image].records
        for target in (Target(max_l1=measured[keys[-2]].l1), parse_target({"tokens": world.budgets[2]}, world.limits, DEFAULT),
                       DEFAULT, parse_target({"min_psnr": measured[keys[0]].psnr, "max_tokens": world.ladder[1]},
                                             world.limits, DEFAULT)):
            result = world.tokenize(image, target)
            answer = Trajectory().merge(result.trajectory).lookup(target, world.limits)
            assert answer is not None, (image, target)
            _same(answer, result)
