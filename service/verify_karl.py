"""Check the KARL port against its golden fixture (`fixtures/karl-reference`), array by array.

The fixture holds a tiny random KARL run by the reference, one image at a time, for 5 token budgets
x 6 quality targets. Here every (budget, quality) pass runs ALL images in ONE `advance` call and is
decoded the way the engine decodes (`decode_logits(kept ids, their positions)`), so the rows check
the batching as well as the numbers: a batched answer must equal the per-image fixture. One more
call mixes budgets and qualities across images and must give each image its own per-pass answer,
and the same weights read from `model.safetensors` must give identical outputs.

Discrete outputs are exact except at the fixture's near-ties (halting: |halt_logit - ln 3| below
1e-2; ids and argmaxes: stored margin below `NEAR_TIE`). Where a halting decision or a kept id
flips at a near-tie, that image's decode legitimately differs, so its logits / L1 / recon rows for
that pass are skipped (counted in the row's near-ties column, never silently passed). Continuous
tolerances are the fixture README's suggestions.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .model.checkpoint import read_state_dict
from .model.family import StepOutput, quality
from .model.karl import KARL, KARLConfig, probe_key
from .model.precision import precision
from .model.transformer import BatchMode
from .verify import NEAR_TIE, Report, to_numpy

HALT_TIE = 1e-2  # |halt_logit - ln 3| below this is a near-tie (the README's level)
LN3 = math.log(3.0)  # sigmoid(logit) > 0.75  <=>  logit > ln 3
ATOL = {"vqgan_z": 1e-5, "img_tokens": 1e-5, "encoder_in": 1e-5, "encoder_out": 1e-3, "latent_out": 1e-3,
        "halt_logit": 5e-3, "prequant": 1e-4, "logits": 2e-4, "recon": 2e-4, "l1": 1e-5}


def _build(cfg: KARLConfig, path: Path, device: str, batch_mode: BatchMode) -> KARL:
    model = KARL(cfg)
    model.load_state_dict(read_state_dict(path), strict=True)
    model.batch_mode = batch_mode
    return model.to(device).eval()


def _kept_rows(rep: Report, name: str, got: Any, expected: Any, keep: np.ndarray, kind: str) -> None:
    """A continuous row over the images in `keep`; the others count as skipped near-ties."""
    rep.continuous(name, to_numpy(got)[keep], to_numpy(expected)[keep], kind, atol=ATOL[kind])
    rep.rows[-1].skipped = int((~keep).sum())


def _stack(outs: list[StepOutput], key: str) -> np.ndarray:
    return to_numpy(torch.stack([o.trace[key] for o in outs]))


def _decode(model: KARL, outs: list[StepOutput], images: torch.Tensor):
    logits = model.decode_logits([o.token_ids for o in outs], [o.positions for o in outs])
    recon = model.reconstruct(logits)
    return logits, recon, quality(recon, images)[0]


def _check_pass(rep: Report, model: KARL, tag: str, outs: list[StepOutput], images: torch.Tensor,
                exp: Any, counts: np.ndarray, l1s: np.ndarray) -> np.ndarray:
    """Every row of one (budget, quality) pass over all images; returns our per-image L1."""
    hl, halted, ids = _stack(outs, "halt_logit"), _stack(outs, "halted"), _stack(outs, "latent_ids")
    e_hl, e_halted, e_ids = exp[f"{tag}_halt_logit"], exp[f"{tag}_halted"], exp[f"{tag}_latent_ids"]
    rep.continuous(f"{tag}/halt_logit", hl, e_hl, "halt_logit", atol=ATOL["halt_logit"])
    rep.discrete(f"{tag}/halted", halted, e_halted, np.abs(e_hl - LN3), tie=HALT_TIE)
    rep.discrete(f"{tag}/latent_ids", ids, e_ids, exp[f"{tag}_latent_ids_margin"], tie=NEAR_TIE)
    # a flipped halting decision changes the count and the decode; a flipped id the decode only
    halt_flip = (halted != e_halted).any(1)
    flip = halt_flip | ((ids != e_ids) & ~(halted & e_halted)).any(1)
    keep = ~flip
    count = np.array([o.token_ids.shape[0] for o in outs])
    rep.discrete(f"{tag}/token_count", count, counts, np.where(halt_flip, 0.0, np.inf))
    for key, kind in (("prequant", "prequant"), ("latent_out", "latent_out")):
        if f"{tag}_{key}" in exp.files:
            rep.continuous(f"{tag}/{key}", _stack(outs, key), exp[f"{tag}_{key}"], kind, atol=ATOL[kind])
    for key, kind in (("encoder_in", "encoder_in"), ("encoder_out", "encoder_out")):
        if f"{tag}_{key}_img0" in exp.files:
            rep.continuous(f"{tag}/{key}_img0", outs[0].trace[key], exp[f"{tag}_{key}_img0"], kind, atol=ATOL[kind])

    logits, recon, l1 = _decode(model, outs, images)
    gap = np.where(keep[:, None], exp[f"{tag}_logits_top2_gap"], 0.0)
    rep.discrete(f"{tag}/logits_argmax", logits.argmax(-1), exp[f"{tag}_logits_argmax"], gap, tie=NEAR_TIE)
    _kept_rows(rep, f"{tag}/l1", l1, l1s, keep, "l1")
    if f"{tag}_recon" in exp.files:
        _kept_rows(rep, f"{tag}/recon", recon, exp[f"{tag}_recon"], keep, "recon")
    if f"{tag}_logits_img0" in exp.files:
        _kept_rows(rep, f"{tag}/logits_img0", logits[:1], exp[f"{tag}_logits_img0"][None], keep[:1], "logits")
    return to_numpy(l1)


def verify_karl(fixture: Path, device: str = "cpu", dtype: str = "float32",
                batch_mode: BatchMode = "packed", compiled: bool = False) -> Report:
    """Check KARL against a fixture folder. `compiled` is accepted for `verify()`'s signature and
    ignored: KARL has no compiled path yet (model/compile.py compiles ALIT)."""
    fx = Path(fixture)
    cfg = KARLConfig.from_reference_json(json.loads((fx / "config.json").read_text()))
    model = _build(cfg, fx / "checkpoint.pth", device, batch_mode)
    exp = np.load(fx / "expected.npz")
    rep = Report("float32" if dtype == "float32" else "reduced")
    images = torch.from_numpy(exp["input"]).to(device)
    n = images.shape[0]
    budgets = [int(t) for t in exp["token_budgets"]]
    qualities = [float(q) for q in exp["qualities"]]
    limits = model.limits
    with torch.inference_mode(), precision(device, dtype):
        z, gt = model.vqgan.encode(images)
        rep.continuous("vqgan_z", z, exp["vqgan_z"], atol=ATOL["vqgan_z"])
        rep.discrete("vqgan_indices", gt, exp["vqgan_indices"], exp["vqgan_indices_margin"])
        rep.continuous("img_tokens_img0", model.image_tokens(images, z)[0], exp["img_tokens_img0"],
                       atol=ATOL["img_tokens"])
        # pure indexing and one addition: exact
        rep.continuous("encoder_pos_embed_16x16", model.encoder_positions(), exp["encoder_pos_embed_16x16"], atol=0.0)
        rep.continuous("decoder_mask_tokens_16x16", model.decoder_queries(), exp["decoder_mask_tokens_16x16"],
                       atol=0.0)
        rep.discrete("quality_probe_bin_index", [limits.quality_bin(float(q)) for q in exp["quality_probe_values"]],
                     exp["quality_probe_bin_index"])
        rep.discrete("quality_bin_index", [limits.quality_bin(q) for q in qualities], exp["quality_bin_index"])

        states = model.prepare(images)
        ours: dict[tuple[int, int], tuple[list[StepOutput], np.ndarray]] = {}
        for qi, q in enumerate(qualities):
            for ti, t in enumerate(budgets):
                tag = f"T{t:03d}_q{round(1000 * q):03d}"
                outs = model.advance(states, [probe_key(t, limits.quality_bin(q))] * n, trace=True)
                l1 = _check_pass(rep, model, tag, outs, images, exp, exp["token_count"][qi, ti], exp["l1"][qi, ti])
                ours[ti, qi] = outs, l1

        # one call, a different (budget, quality) per image: each must get its own pass's answer
        picks = [(b % len(budgets), (b + 2) % len(qualities)) for b in range(n)]
        mixed = model.advance(states, [probe_key(budgets[ti], limits.quality_bin(qualities[qi])) for ti, qi in picks],
                              trace=True)
        alone = [ours[p][0][b] for b, p in enumerate(picks)]
        for key in ("halted", "latent_ids"):
            rep.discrete(f"mixed/{key}", np.concatenate([to_numpy(o.trace[key]) for o in mixed]),
                         np.concatenate([to_numpy(o.trace[key]) for o in alone]))
        rep.continuous("mixed/halt_logit", np.concatenate([to_numpy(o.trace["halt_logit"]) for o in mixed]),
                       np.concatenate([to_numpy(o.trace["halt_logit"]) for o in alone]), "halt_logit", atol=1e-4)
        _, _, l1 = _decode(model, mixed, images)
        rep.continuous("mixed/l1", l1, [ours[p][1][b] for b, p in enumerate(picks)], "l1", atol=1e-6)

        # the same weights from model.safetensors: identical tensors, identical outputs
        twin = _build(cfg, fx / "model.safetensors", device, batch_mode)
        a, b = model.state_dict(), twin.state_dict()
        rep.discrete("safetensors/state_dict_equal", [torch.equal(a[k], b[k]) for k in a], [True] * len(a))
        probe = [probe_key(cfg.default_budget, limits.quality_bin(0.05))] * n  # the reference demo's call
        _, recon_pth, _ = _decode(model, model.advance(model.prepare(images), probe), images)
        _, recon_st, _ = _decode(twin, twin.advance(twin.prepare(images), probe), images)
        rep.discrete("safetensors/recon_vs_pth", recon_st, recon_pth)
    return rep
