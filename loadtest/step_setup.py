"""What the step-level measurements (batch_modes.py, compile_steps.py) share: images spread over the
iterations as continuous batching mixes them, a step that can be re-run from the same states, and a
best-of timer."""

from __future__ import annotations

import time


def best_of(fn, n: int = 5) -> float:
    """Fastest of `n` calls of `fn`, seconds."""
    best = float("inf")
    for _ in range(n):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def spread(model, images, spread_out: bool = True):
    """States of `images` after prepare; with `spread_out`, image i has run i % max_iters iterations."""
    states = model.prepare(images)
    for k in range(model.cfg.max_iters - 1 if spread_out else 0):
        sub = [s for i, s in enumerate(states) if i % model.cfg.max_iters > k]
        if sub:
            model.advance(sub, halting=True)
    return states


def repeatable_step(model, states):
    """A function running one step with halting over `states`, each call from the same starting point."""
    saved = [(s.x, s.iteration) for s in states]

    def step():
        for s, (x, it) in zip(states, saved):
            s.x, s.iteration = x, it
        return model.advance(states, halting=True)

    return step
