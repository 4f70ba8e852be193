"""The model reproduces the reference fixture (random weights, real photos, every iteration)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.model.alit import quality, reference_stop_iteration
from service.verify import verify


def test_state_dict_names_and_shapes_match_the_reference(ref_model, fixture_dir):
    lines = [l.split("\t") for l in (fixture_dir / "keys.txt").read_text().splitlines() if not l.startswith("#")]
    reference = {name: tuple(int(d) for d in shape.split("x")) for name, shape, _ in lines}
    ours = {k: tuple(v.shape) for k, v in ref_model.state_dict().items()}
    assert ours == reference


def test_verify_passes_on_the_fixture_in_every_batch_mode(fixture_dir):
    # and varlen, whose kernel runs on CUDA only: test_batching runs its layout with a stand-in kernel,
    # loadtest/gpu_checks.sh verifies it on a GPU
    for mode in ("packed", "cohort", "padded"):
        report = verify(fixture_dir, batch_mode=mode)
        assert report.ok, report.table()
        names = {r.name for r in report.rows}
        # every per-iteration array and the halting runs were actually compared
        assert {"recon_iter7", "l1_iter0", "encode_stop_iter", "halting_seed0/latent_ids_iter7",
                "halting_seed0_thr0/drop_mask_iter3"} <= names
        assert all(r.compared > 0 for r in report.rows)


def test_verify_passes_on_the_fixture_compiled(fixture_dir):
    report = verify(fixture_dir, compiled=True)  # ALIT_COMPILE: torch.compile of the packed blocks and VQGAN
    assert report.ok, report.table()
    assert all(r.compared > 0 for r in report.rows)


def test_injected_draws_reproduce_the_halting_runs(ref_model, images, fixture_dir):
    for name in ("expected_halting_seed0.npz", "expected_halting_seed0_thr0.npz"):
        h = np.load(fixture_dir / name)
        states = ref_model.prepare(images)
        masked = []
        for k in range(8):
            draws = list(torch.from_numpy(h[f"bernoulli_iter{k}"]))
            outs = ref_model.advance(states, halting=True, threshold=float(h["threshold"]), draws=draws)
            ids = torch.stack([o.token_ids for o in outs]).numpy()
            np.testing.assert_array_equal(ids, h[f"latent_ids_iter{k}"])
            masked.append(int(torch.stack([o.drop_mask for o in outs]).sum()))
        assert masked == [int(h[f"drop_mask_iter{k}"].sum()) for k in range(8)]


def test_encode_threshold_stops_where_the_reference_stops(ref_model, images, expected):
    thr = float(expected["encode_threshold"])
    for b in range(images.shape[0]):
        states = ref_model.prepare(images[b : b + 1])
        l1s = []
        for _ in range(8):
            out = ref_model.advance(states)
            l1, _ = quality(ref_model.reconstruct(ref_model.decode_logits([out[0].token_ids])), images[b : b + 1])
            l1s.append(float(l1[0]))
        assert reference_stop_iteration(l1s, thr) == expected["encode_stop_iter"][b]


def test_reference_stop_rule_returns_lowest_l1_when_unmet():
    assert reference_stop_iteration([0.5, 0.3, 0.4], 0.1) == 1
    assert reference_stop_iteration([0.5, 0.05, 0.01], 0.1) == 1
    assert reference_stop_iteration([0.2, 0.2], 0.1) == 0


class _DeviceTensor(torch.Tensor):
    """Acts as a CUDA tensor does for numpy: no implicit conversion (np.asarray raises)."""

    def __array__(self, *args, **kwargs):
        raise TypeError("can't convert cuda:0 device type tensor to numpy")


def test_report_compares_tensors_on_a_device():
    """Verify's comparisons take tensors on either side: KARL's and One-D-Piece's checks compare two of
    the model's own outputs (safetensors against .pth), both on the device (found on CUDA)."""
    from service.verify import Report

    ids = torch.tensor([[1, 2, 3]]).as_subclass(_DeviceTensor)
    with pytest.raises(TypeError):
        np.asarray(ids)
    rep = Report("float32")
    rep.discrete("ids", torch.tensor([[1, 2, 4]]), ids, margin=torch.ones(1, 3).as_subclass(_DeviceTensor))
    rep.continuous("x", torch.zeros(2), torch.full((2,), 0.5).as_subclass(_DeviceTensor))
    assert [r.error for r in rep.rows] == [1, 0.5]
    assert not rep.ok
