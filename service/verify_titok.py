"""Check the TiTok / One-D-Piece port against its golden fixture (`fixtures/one-d-piece-reference`).

The fixture holds a tiny random One-D-Piece run by the reference on 7 images: the encoder's
intermediates and token ids, and for prefix lengths 1..64 the L1 / PSNR of the reconstruction (the
logits' argmax and the reconstruction itself at the 11 "ladder" lengths). Here:

* the weights are read from BOTH `pytorch_model.bin` (the released format, `torch.load` with
  `weights_only=True`) and `model.safetensors`, each loaded strictly into a model built from the
  fixture's own `config.json`; they must hold identical tensors and give identical pixels;
* the encoder runs once for the whole batch (`prepare`), and EVERY prefix of every image — 64 x 7
  sequences of 64 different lengths — is decoded in ONE `decode_logits` call (packed), so every row
  below checks the batching as well as the numbers; one image decoded on its own must agree with it;
* the model must be in eval mode and draw nothing from the RNG (the reference's training mode draws
  a random prefix length per call).

The input is the fixture's stored tensor (the reference preprocesses with PIL *bilinear*; see
`service/model/titok.py`). Ids and argmaxes are exact except at the fixture's near-ties (stored
margin below `NEAR_TIE`); a flipped id changes every decode whose prefix holds it, so those decodes
are skipped (counted in the near-ties column). Float tolerances are the fixture README's advice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .model.checkpoint import check_state_dict, read_state_dict
from .model.precision import precision
from .model.titok import TiTok, TiTokConfig
from .model.transformer import BatchMode
from .verify import NEAR_TIE, Report, to_numpy

# the fixture README's suggested float32 tolerances
ATOL = {"encoder_ln_post": 2e-4, "encoder_out": 2e-5, "logits": 5e-4, "pixel_code": 2e-4, "recon": 5e-4,
        "l1": 1e-5, "psnr": 1e-4, "psnr_uint8": 1e-3}
# one image decoded alone vs packed with 447 others: float noise (~1e-5 on logits up to |16|); a batching
# bug (a sequence attending to another, a wrong length's positions) moves them by O(1)
ALONE_ATOL = 1e-4
PIXEL_CHUNK = 56  # images per pixel-decoder call (memory)


def _build(cfg: TiTokConfig, path: Path, device: str, batch_mode: BatchMode) -> TiTok:
    model = TiTok(cfg)
    sd = read_state_dict(path)  # .bin: torch.load(weights_only=True); .safetensors: safetensors
    check_state_dict(model, sd)  # every missing / unexpected / wrongly-shaped key at once
    model.load_state_dict(sd, strict=True)
    model.batch_mode = batch_mode
    return model.to(device).eval()


def _reference_keys(fixture: Path) -> dict[str, tuple[int, ...]]:
    rows = [ln.split("\t") for ln in (fixture / "keys.txt").read_text().splitlines() if ln and not ln.startswith("#")]
    return {name: tuple(int(d) for d in shape.split("x")) for name, shape, _ in rows}


def _exact(rep: Report, name: str, got: Any, expected: Any) -> None:
    """A structural check (same files, same calls, same state): exact in every precision."""
    rep.discrete(name, got, expected)
    rep.rows[-1].tolerance = 0


def _kept(rep: Report, name: str, got: Any, expected: Any, keep: np.ndarray, kind: str) -> None:
    """A continuous row over the entries `keep` marks (leading axes); the rest count as near-ties."""
    rep.continuous(name, to_numpy(got)[keep], to_numpy(expected)[keep], atol=ATOL[kind])
    rep.rows[-1].skipped = int((~keep).sum())


def _psnr_uint8(recon: torch.Tensor, images: torch.Tensor) -> np.ndarray:
    """The reference evaluation's PSNR: round(clamp(recon, 0, 1) * 255) in float32 (half to even)
    against round(input * 255), peak 255, in float64."""
    r8 = torch.round(recon.float().clamp(0, 1) * 255).double()
    x8 = torch.round(images.float() * 255).double()
    mse = (r8 - x8).pow(2).flatten(1).mean(1)
    return to_numpy(10 * torch.log10(255.0**2 / mse))


def verify_titok(fixture: Path, device: str = "cpu", dtype: str = "float32",
                 batch_mode: BatchMode = "packed", compiled: bool = False) -> Report:
    """Check TiTok / One-D-Piece against a fixture folder. `compiled` is accepted for `verify()`'s
    signature and ignored: this family has no compiled path yet (model/compile.py compiles ALIT)."""
    fx = Path(fixture)
    cfg = TiTokConfig.from_reference_json(json.loads((fx / "config.json").read_text()))
    model = _build(cfg, fx / "pytorch_model.bin", device, batch_mode)
    twin = _build(cfg, fx / "model.safetensors", device, batch_mode)
    exp = np.load(fx / "expected.npz")
    rep = Report("float32" if dtype == "float32" else "reduced")
    images = torch.from_numpy(exp["input"]).to(device)
    n_img, n_tok = images.shape[0], cfg.num_latent_tokens
    lengths = [int(k) for k in exp["all_lengths"]]
    ladder = [int(k) for k in exp["ladder_lengths"]]

    # ----- loading: names and shapes as the reference's, both files the same, eval mode ----------
    reference = _reference_keys(fx)
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    same = [own.get(k) == shape for k, shape in reference.items()] + [len(own) == len(reference)]
    _exact(rep, "load/keys_and_shapes_vs_keys.txt", same, [True] * len(same))
    a, b = model.state_dict(), twin.state_dict()
    _exact(rep, "load/bin_vs_safetensors_tensors", [torch.equal(a[k], b[k]) for k in a], [True] * len(a))
    _exact(rep, "load/eval_mode", [model.training, twin.training], [False, False])

    rng_before = _rng_state(device)
    with torch.inference_mode(), precision(device, dtype):
        # ----- encoder: once for the batch --------------------------------------------------------
        ids, trace = model.encode(images)
        rep.continuous("encoder_ln_post", trace["ln_post"], exp["encoder_ln_post"], atol=ATOL["encoder_ln_post"])
        enc_out = trace["prequant"].transpose(1, 2)[:, :, None, :]  # the reference's (B, D, 1, N)
        rep.continuous("encoder_out", enc_out, exp["encoder_out"], atol=ATOL["encoder_out"])
        rep.discrete("token_ids", ids, exp["token_ids"], exp["token_id_margin"], tie=NEAR_TIE)
        states = model.prepare(images)
        _exact(rep, "prepare/token_ids_vs_encode", torch.stack([s.token_ids for s in states]), ids)

        # a flipped id (at a near-tie) changes every decode whose prefix holds it
        flips = to_numpy(ids) != exp["token_ids"]
        first_flip = np.where(flips.any(1), flips.argmax(1), n_tok)  # per image
        keep = np.array([[k <= first_flip[b] for b in range(n_img)] for k in lengths])  # (lengths, images)

        # ----- every prefix of every image in ONE decode call (64 lengths x 7 images) -------------
        outs = model.advance(states * len(lengths), [k for k in lengths for _ in states])  # one call, mixed
        _exact(rep, "advance/prefixes_are_the_ids", torch.cat([o.token_ids for o in outs]),
               torch.cat([ids[i, :k] for k in lengths for i in range(n_img)]))
        logits = model.decode_logits([o.token_ids for o in outs])  # (64 * 7, G, V), row = (k - 1) * 7 + b
        recon = torch.cat([model.reconstruct(logits[i : i + PIXEL_CHUNK])
                           for i in range(0, logits.shape[0], PIXEL_CHUNK)])
        grid = logits.view(len(lengths), n_img, *logits.shape[1:])
        pix = recon.view(len(lengths), n_img, *recon.shape[1:])

        for li, k in enumerate(ladder):
            row = lengths.index(k)
            gap = np.where(keep[row][:, None], exp["logits_top2_gap"][li], 0.0)
            rep.discrete(f"k{k:02d}/logits_argmax", grid[row].argmax(-1), exp["logits_argmax"][li], gap, tie=NEAR_TIE)
            _kept(rep, f"k{k:02d}/recon", pix[row], exp["recon"][li], keep[row], "recon")
        for k, name in zip(exp["logits_img0_lengths"], ("logits_img0_short", "logits_img0_full")):
            row = lengths.index(int(k))
            _kept(rep, f"k{int(k):02d}/{name}", grid[row, :1], exp[name][None], keep[row, :1], "logits")
        full = lengths.index(n_tok)
        code = model.pixel_code(grid[full])
        _kept(rep, f"k{n_tok:02d}/pixel_code_full", code, exp["pixel_code_full"], keep[full], "pixel_code")
        _kept(rep, f"k{n_tok:02d}/recon_vs_forward_full", pix[full], exp["recon_forward_full"], keep[full], "recon")

        # ----- quality at every length the fixture holds ------------------------------------------
        x64 = images.double()
        r64 = pix.double()
        l1 = to_numpy((r64 - x64).abs().flatten(2).mean(2))
        mse = (r64.clamp(0, 1) - x64).pow(2).flatten(2).mean(2)
        psnr = to_numpy(10 * torch.log10(1.0 / mse))
        psnr8 = np.stack([_psnr_uint8(pix[r], images) for r in range(len(lengths))])
        _kept(rep, "all_lengths/l1", l1, exp["l1"], keep, "l1")
        _kept(rep, "all_lengths/psnr", psnr, exp["psnr"], keep, "psnr")
        _kept(rep, "all_lengths/psnr_uint8", psnr8, exp["psnr_uint8"], keep, "psnr_uint8")

        # ----- batching: one image alone against the 448-sequence packed call --------------------
        b0 = 3
        alone_lengths = [1, 16, 33, n_tok]
        alone = torch.cat([model.decode_logits([ids[b0, :k]]) for k in alone_lengths])
        packed = torch.stack([grid[lengths.index(k), b0] for k in alone_lengths])
        rep.continuous(f"batch/img{b0}_alone_vs_packed_logits", alone, packed, atol=ALONE_ATOL)
        top2 = packed.topk(2, dim=-1).values
        rep.discrete(f"batch/img{b0}_alone_vs_packed_argmax", alone.argmax(-1), packed.argmax(-1),
                     to_numpy(top2[..., 0] - top2[..., 1]), tie=NEAR_TIE)

        # ----- the safetensors twin end to end, the same calls: identical pixels -------------------
        ends = [_end_to_end(m, images, [16, n_tok]) for m in (model, twin)]
        _exact(rep, "load/bin_vs_safetensors_token_ids", ends[1][0], ends[0][0])
        _exact(rep, f"load/bin_vs_safetensors_recon_k16_k{n_tok}", ends[1][1], ends[0][1])
    _exact(rep, "rng/nothing_drawn", [torch.equal(rng_before, _rng_state(device))], [True])
    return rep


def _rng_state(device: str) -> torch.Tensor:
    """The RNG state a draw on `device` would advance (the CPU generator, and the device's)."""
    if torch.device(device).type == "cuda":
        return torch.cat([torch.get_rng_state(), torch.cuda.get_rng_state(torch.device(device))])
    return torch.get_rng_state()


def _end_to_end(model: TiTok, images: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels -> ids -> every image's prefix at each of `lengths` (one decode call) -> pixels."""
    states = model.prepare(images)
    outs = [o for k in lengths for o in model.advance(states, [k] * len(states))]
    recon = model.reconstruct(model.decode_logits([o.token_ids for o in outs]))
    return torch.stack([s.token_ids for s in states]), recon
