"""`alit-serve verify`: compare this implementation with a reference fixture, array by array.

`verify(fixture)` reads the fixture's `config.json`, asks the model registry which family it
describes, and runs that family's checker (its `Family.verifier`), which fills a `Report`; the
report's rows, tolerances and table are shared by every family. ALIT's checker is `verify_alit`
below.

An ALIT fixture directory holds `config.json` (reference constructor arguments + VQGAN config),
`checkpoint.pth` (weights under `ema`), `expected.npz` (per-iteration outputs with dynamic halting
off) and optionally `expected_halting_*.npz` (halting on, with the raw Bernoulli draws, which are
injected here). Discrete outputs must match exactly except where the stored near-tie margin is
below `NEAR_TIE`; continuous ones within the tolerances below. The exit status says whether all did.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .model.alit import ALIT, reference_stop_iteration
from .model.checkpoint import build_model, read_config_file, read_state_dict
from .model.compile import compile_model
from .model.measure import iterate_and_measure
from .model.precision import precision
from .model.transformer import BatchMode

NEAR_TIE = 1e-4

# Absolute tolerances. float32 follows the fixture's own advice; the reduced-precision column is
# what a bf16/fp16 deployment is held to (see docs/verification.md), discrete outputs there may flip
# at up to MAX_FLIP_FRACTION of the compared positions.
TOLERANCES = {
    "float32": {"recon": 1e-4, "l1": 1e-5, "default": 1e-4},
    "reduced": {"recon": 0.15, "l1": 0.01, "default": 0.1},
}
MAX_FLIP_FRACTION = {"float32": 0.0, "reduced": 0.05}
REDUCED_RELATIVE = 0.1  # reduced precision, where a checker gives its own float32 tolerance: 10 % of the values' range


@dataclass
class Row:
    name: str
    compared: int
    skipped: int
    error: float  # max abs error (continuous) or mismatches (discrete)
    tolerance: float
    discrete: bool

    @property
    def ok(self) -> bool:
        return self.error <= self.tolerance


@dataclass
class Report:
    precision: str
    rows: list[Row] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    def tol(self, kind: str) -> float:
        t = TOLERANCES[self.precision]
        return t.get(kind, t["default"])

    def continuous(self, name: str, got, expected, kind: str = "default", atol: float | None = None) -> None:
        """Max abs error within `atol` (a fixture's own float32 advice; in reduced precision, 10 % of the
        largest expected magnitude, at least the `kind`'s tolerance) or the `kind`'s tolerance."""
        got, expected = to_numpy(got), to_numpy(expected)  # either side may be a tensor on the device
        if got.shape != expected.shape:
            raise AssertionError(f"{name}: shape {got.shape} != expected {expected.shape}")
        err = float(np.abs(got.astype(np.float64) - expected).max()) if got.size else 0.0
        if atol is None:
            tol = self.tol(kind)
        elif self.precision == "float32":
            tol = atol
        else:  # a fixture-specific scale: reduced precision errs relative to the values' size
            tol = max(self.tol(kind), REDUCED_RELATIVE * float(np.abs(expected).max(initial=0.0)))
        self.rows.append(Row(name, got.size, 0, err, tol, False))

    def discrete(self, name: str, got, expected, margin=None, tie: float = NEAR_TIE) -> None:
        """Exact comparison except where `margin` (distance to a decision boundary) is below `tie`."""
        got, expected = to_numpy(got), to_numpy(expected)  # either side may be a tensor on the device
        if got.shape != expected.shape:
            raise AssertionError(f"{name}: shape {got.shape} != expected {expected.shape}")
        keep = np.ones(got.shape, bool) if margin is None else to_numpy(margin) >= tie
        mism = int(((got != expected) & keep).sum())
        allowed = int(MAX_FLIP_FRACTION[self.precision] * keep.sum())
        self.rows.append(Row(name, int(keep.sum()), int((~keep).sum()), mism, allowed, True))

    def table(self) -> str:
        lines = [f"{'check':<40} {'compared':>9} {'near-ties':>9} {'max err / mismatches':>21} {'tolerance':>10}  ok"]
        for r in self.rows:
            err = f"{int(r.error)}" if r.discrete else f"{r.error:.3e}"
            tol = f"{int(r.tolerance)}" if r.discrete else f"{r.tolerance:.0e}"
            lines.append(f"{r.name:<40} {r.compared:>9} {r.skipped:>9} {err:>21} {tol:>10}  {'ok' if r.ok else 'FAIL'}")
        failing = sum(not r.ok for r in self.rows)
        lines.append(f"RESULT: {'PASS' if self.ok else 'FAIL'} ({failing} failing of {len(self.rows)})")
        return "\n".join(lines)


def to_numpy(t) -> np.ndarray:
    """A tensor (on any device; floating point as float32) or array-like as a numpy array."""
    if isinstance(t, torch.Tensor):
        return t.detach().float().cpu().numpy() if t.is_floating_point() else t.detach().cpu().numpy()
    return np.asarray(t)


def run_iterations(model: ALIT, images: torch.Tensor, halting: bool = False, threshold=None, draws=None):
    """Every iteration for a batch: per iteration (step outputs, logits, reconstructions, L1)."""
    return [(m.steps, m.logits, m.recon, m.l1)
            for m in iterate_and_measure(model, images, halting=halting, threshold=threshold, draws=draws, trace=True)]


def verify(fixture: str | Path, device: str = "cpu", dtype: str = "float32",
           batch_mode: BatchMode = "packed", compiled: bool = False) -> Report:
    """Check this implementation against a golden fixture of any registered family. A batch mode that
    cannot run on `device` in `dtype` raises ValueError (transformer.check_batch_mode)."""
    import importlib

    from .model.registry import family_of_fixture
    from .model.transformer import check_batch_mode

    check_batch_mode(batch_mode, device, dtype)

    module, _, fn = family_of_fixture(Path(fixture)).verifier.partition(":")
    check = getattr(importlib.import_module(module), fn)
    return check(Path(fixture), device=device, dtype=dtype, batch_mode=batch_mode, compiled=compiled)


def verify_alit(fixture: Path, device: str = "cpu", dtype: str = "float32",
                batch_mode: BatchMode = "packed", compiled: bool = False) -> Report:
    fx = fixture
    cfg = read_config_file(fx / "config.json")
    model = build_model(cfg, read_state_dict(fx / "checkpoint.pth")).to(device)
    model.batch_mode = batch_mode
    if compiled:
        compile_model(model)
    exp = np.load(fx / "expected.npz")
    rep = Report("float32" if dtype == "float32" else "reduced")
    images = torch.from_numpy(exp["input"]).to(device)
    with torch.inference_mode(), precision(device, dtype):
        z, gt = model.vqgan.encode(images)
        rep.continuous("vqgan_z", z, exp["vqgan_z"])
        rep.discrete("vqgan_indices", gt, exp["vqgan_indices"], exp["vqgan_indices_margin"])
        rep.continuous("img_tokens_normalized_img0", model.image_tokens(images, z)[0],
                       exp["img_tokens_normalized_img0"])

        for k, (steps, logits, recon, l1) in enumerate(run_iterations(model, images)):
            ids = torch.stack([s.token_ids for s in steps])
            rep.discrete(f"latent_ids_iter{k}", ids, exp[f"latent_ids_iter{k}"], exp[f"latent_ids_margin_iter{k}"])
            prequant = torch.stack([s.trace["prequant"] for s in steps])
            rep.continuous(f"prequant_iter{k}", prequant, exp[f"prequant_iter{k}"])
            rep.discrete(f"logits_argmax_iter{k}", logits.argmax(-1), exp[f"logits_argmax_iter{k}"],
                         exp[f"logits_top2_gap_iter{k}"])
            probs = logits.softmax(-1).gather(2, gt[..., None])[..., 0]
            rep.continuous(f"pred_gt_prob_iter{k}", probs, exp[f"pred_gt_prob_iter{k}"])
            rep.continuous(f"recon_iter{k}", recon, exp[f"recon_iter{k}"], "recon")
            rep.continuous(f"l1_iter{k}", l1, exp[f"l1_iter{k}"], "l1")
            if k == 0:
                latent = torch.stack([s.trace["latent_tokens"] for s in steps])
                rep.continuous("latent_tokens_iter0", latent, exp["latent_tokens_iter0"])
                rep.continuous("logits_iter0_img0", logits[0], exp["logits_iter0_img0"])
            if k == cfg.max_iters - 1:
                rep.continuous(f"logits_iter{k}_img0", logits[0], exp[f"logits_iter{k}_img0"])

        # encode(threshold), one image per call as the reference must be called for per-image stops
        if "encode_threshold" in exp.files:
            thr = float(exp["encode_threshold"])
            stops, l1s = [], []
            for b in range(images.shape[0]):
                per_iter = [float(r[3][0]) for r in run_iterations(model, images[b : b + 1])]
                stop = reference_stop_iteration(per_iter, thr)
                stops.append(stop)
                l1s.append(per_iter[stop])
            # a stop can only move where an L1 lies within tolerance of the threshold, or (when no
            # iteration meets it) where the two lowest L1s are within tolerance of each other
            table = np.sort(exp["l1_table"], axis=0)
            margin = np.minimum(np.abs(exp["l1_table"] - thr).min(axis=0), table[1] - table[0])
            rep.discrete("encode_stop_iter", np.array(stops), exp["encode_stop_iter"], margin, tie=rep.tol("l1"))
            rep.continuous("encode_l1", np.array(l1s), exp["encode_l1"], "l1")

        for path in sorted(fx.glob("expected_halting_*.npz")):
            h = np.load(path)
            draws = [h[f"bernoulli_iter{k}"] for k in range(cfg.max_iters)]
            tag = path.stem.replace("expected_", "")
            run = run_iterations(model, images, halting=True, threshold=float(h["threshold"]), draws=draws)
            for k, (steps, logits, _, l1) in enumerate(run):
                ids = torch.stack([s.token_ids for s in steps])
                rep.discrete(f"{tag}/latent_ids_iter{k}", ids, h[f"latent_ids_iter{k}"])
                rep.discrete(f"{tag}/logits_argmax_iter{k}", logits.argmax(-1), h[f"logits_argmax_iter{k}"])
                masks = torch.stack([s.drop_mask for s in steps]).int()
                rep.discrete(f"{tag}/drop_mask_iter{k}", masks, h[f"drop_mask_iter{k}"].astype(int))
                probs = torch.stack([s.pred_gt_prob for s in steps])
                rep.continuous(f"{tag}/pred_gt_prob_iter{k}", probs, h[f"pred_gt_prob_iter{k}"])
                rep.continuous(f"{tag}/l1_iter{k}", l1, h[f"l1_iter{k}"], "l1")
    return rep
