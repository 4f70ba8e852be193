"""An image's tokens never depend on its batch-mates, its batch size or their iterations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from service.engine import Engine, EngineSettings
from service.model import transformer
from service.model.measure import iterate_and_measure, measure_step
from service.model.registry import resolve
from service.verify import NEAR_TIE, verify


def _trajectory(model, states, images, halting=False):
    """Run `states` to the end; per image, per iteration: (ids, L1)."""
    ids = [[] for _ in states]
    l1s = [[] for _ in states]
    for m in iterate_and_measure(model, images, halting=halting, states=states):
        for i, o in enumerate(m.steps):
            ids[i].append(o.token_ids.numpy())
            l1s[i].append(float(m.l1[i]))
    return ids, l1s


def _same_ids(a, b, margin):
    keep = margin >= NEAR_TIE
    np.testing.assert_array_equal(a[keep], b[keep])


def one_sequence_at_a_time(q, k, v, cu_q, cu_k, max_q, max_k):
    """A stand-in for torch's variable-length flash attention, which runs on CUDA only: its contract
    (q, k, v as (tokens, heads, head_dim), every sequence within cu_seqlens' bounds attending to itself
    alone), computed per sequence with SDPA. The real kernel is checked on a GPU (`alit-serve verify
    --batch-mode varlen --device cuda --dtype bfloat16`, loadtest/gpu_checks.sh)."""
    assert cu_q.dtype == torch.int32 and torch.equal(cu_q, cu_k) and max_q == max_k
    bounds = cu_q.tolist()
    assert bounds[0] == 0 and bounds[-1] == q.shape[0] and max(b - a for a, b in zip(bounds, bounds[1:])) == max_q
    out = torch.empty_like(q)
    for a, b in zip(bounds, bounds[1:]):
        out[a:b] = F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v))).transpose(0, 1)
    return out


@pytest.mark.parametrize("mode", ["packed", "cohort", "padded", "varlen"])
def test_alone_vs_batch_vs_mixed_iterations(ref_model, images, expected, mode, monkeypatch):
    """Every batch mode; `varlen`'s layout (one attention call over every length of the step) with the
    stand-in kernel above."""
    lengths_per_call: list[set[int]] = []

    def kernel(q, k, v, cu_q, *rest):
        lengths_per_call.append(set(torch.diff(cu_q).tolist()))
        return one_sequence_at_a_time(q, k, v, cu_q, *rest)

    if mode == "varlen":
        monkeypatch.setattr(transformer, "_varlen_kernel", lambda: kernel)
    ref_model.batch_mode = mode
    try:
        batch_ids, batch_l1 = _trajectory(ref_model, ref_model.prepare(images), images)
        # mixed: images 0-3 start now, images 4-6 join three iterations later and share steps
        early = ref_model.prepare(images[:4])
        late = ref_model.prepare(images[4:])
        mixed_ids = [[] for _ in range(7)]
        mixed_l1 = [[] for _ in range(7)]
        step = 0
        while not late[0].finished:
            active = [(i, s) for i, s in enumerate(early) if not s.finished]
            if step >= 3:
                active += [(4 + i, s) for i, s in enumerate(late)]
            iters = {s.iteration for _, s in active}
            if step >= 3 and not early[0].finished:
                assert len(iters) == 2  # really mixed
            m = measure_step(ref_model, ref_model.advance([s for _, s in active]), images[[i for i, _ in active]])
            for (i, _), o, v in zip(active, m.steps, m.l1):
                mixed_ids[i].append(o.token_ids.numpy())
                mixed_l1[i].append(float(v))
            step += 1
        for b in range(7):
            alone_ids, alone_l1 = _trajectory(ref_model, ref_model.prepare(images[b : b + 1]), images[b : b + 1])
            for k in range(8):
                margin = expected[f"latent_ids_margin_iter{k}"][b]
                _same_ids(alone_ids[0][k], batch_ids[b][k], margin)
                _same_ids(alone_ids[0][k], mixed_ids[b][k], margin)
            np.testing.assert_allclose(alone_l1[0], batch_l1[b], atol=1e-5, rtol=0)
            np.testing.assert_allclose(alone_l1[0], mixed_l1[b], atol=1e-5, rtol=0)
        if mode == "varlen":  # the mixed steps ran sequences of different lengths through one call
            assert max(len(lengths) for lengths in lengths_per_call) >= 2
    finally:
        ref_model.batch_mode = "packed"


def test_halting_on_same_image_with_different_batch_mates(ref_model, images):
    a = torch.stack([images[0], images[1], images[2]])
    b = torch.stack([images[5], images[0], images[6], images[3]])
    ids_a, _ = _trajectory(ref_model, ref_model.prepare(a), a, halting=True)
    ids_b, _ = _trajectory(ref_model, ref_model.prepare(b), b, halting=True)
    for k in range(8):
        np.testing.assert_array_equal(ids_a[0][k], ids_b[1][k])


def test_halting_draws_are_per_image_and_seeded_by_content(ref_model, images):
    s1 = ref_model.prepare(images[:2])
    s2 = ref_model.prepare(images[1:3])
    assert s1[1].seed == s2[0].seed
    assert s1[0].seed != s1[1].seed
    # halting at threshold 0 masks something (the draws are live, not all zero)
    outs = ref_model.advance(s1, halting=True, threshold=0.0)
    assert sum(int(o.drop_mask.sum()) for o in outs) > 0


def test_advance_rejects_finished_images(ref_model, images):
    states = ref_model.prepare(images[:1])
    for _ in range(8):
        ref_model.advance(states)
    assert states[0].finished and states[0].token_ids.shape == (256,)
    with pytest.raises(ValueError, match="already run every iteration"):
        ref_model.advance(states)


def test_prepare_rejects_wrong_image_shape(ref_model):
    with pytest.raises(ValueError, match=r"\(B, 3, 64, 64\)"):
        ref_model.prepare(torch.zeros(1, 3, 32, 32))


def test_varlen_is_refused_where_its_kernel_cannot_run(fixture_dir):
    """Flash attention's variable-length kernel: CUDA in float16 / bfloat16 only. Elsewhere the mode is a
    clear error before any work: at a worker's start, and in verify."""
    with pytest.raises(ValueError, match="'varlen'.*CUDA in float16 or bfloat16 only.*'cpu' in float32"):
        transformer.check_batch_mode("varlen", "cpu", "float32")
    with pytest.raises(ValueError, match="'cuda:0' in float32"):
        transformer.check_batch_mode("varlen", "cuda:0", "float32")
    with pytest.raises(ValueError, match="'sideways' is none of packed, cohort, padded, varlen"):
        transformer.check_batch_mode("sideways", "cpu", "float32")
    assert transformer.check_batch_mode("padded", "cpu", "float32") == "padded"
    with pytest.raises(ValueError, match="'varlen'"):
        Engine(resolve("preset:test_tiny"), EngineSettings(devices="cpu", batch_mode="varlen", warmup=False)).start()
    with pytest.raises(ValueError, match="'varlen'"):
        verify(fixture_dir, batch_mode="varlen")
