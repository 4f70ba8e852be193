"""The KARL port: golden-fixture parity, checkpoint layouts, quality bins, limits, batching."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from service.model.checkpoint import CheckpointMismatch, check_state_dict
from service.model.config import ConfigError
from service.model.family import TargetError
from service.model.karl import (
    KARL,
    PRESETS,
    KARLConfig,
    KARLLimits,
    check_weights,
    infer_config,
    probe_key,
    quality_bin,
    split_probe,
)
from service.verify_karl import verify_karl

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "karl-reference"


@pytest.fixture(scope="module")
def exp() -> dict[str, np.ndarray]:
    with np.load(FIXTURE / "expected.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def ref_json() -> dict:
    return json.loads((FIXTURE / "config.json").read_text())


@pytest.fixture(scope="module")
def ema() -> dict[str, torch.Tensor]:
    return torch.load(FIXTURE / "checkpoint.pth", map_location="cpu", weights_only=True)["ema"]


@pytest.fixture(scope="module")
def model(ref_json, ema) -> KARL:
    m = KARL(KARLConfig.from_reference_json(ref_json))
    m.load_state_dict(ema, strict=True)
    return m.eval()


@pytest.fixture(scope="module")
def images(exp) -> torch.Tensor:
    return torch.from_numpy(exp["input"])


def test_verify_passes_in_float32():
    report = verify_karl(FIXTURE)
    assert report.ok, report.table()
    names = {r.name for r in report.rows}
    assert {"T256_q050/recon", "T016_q500/logits_img0", "T512_q000/l1", "T032_q050/encoder_out_img0",
            "quality_probe_bin_index", "mixed/latent_ids", "safetensors/recon_vs_pth"} <= names
    assert all(r.compared > 0 for r in report.rows)


def test_state_dict_names_and_shapes_match_the_reference(model):
    lines = [ln.split("\t") for ln in (FIXTURE / "keys.txt").read_text().splitlines() if not ln.startswith("#")]
    reference = {name: tuple(int(d) for d in shape.split("x")) for name, shape, _ in lines}
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == reference


def test_pth_and_safetensors_load_strictly_and_agree(model, ref_json, images):
    twin = KARL(KARLConfig.from_reference_json(ref_json))
    twin.load_state_dict(load_file(str(FIXTURE / "model.safetensors")), strict=True)
    twin.eval()
    probes = [probe_key(32, 5)] * 2
    outs = [m.advance(m.prepare(images[:2]), probes) for m in (model, twin)]
    for a, b in zip(*outs):
        assert torch.equal(a.token_ids, b.token_ids) and torch.equal(a.positions, b.positions)
    recon = [m.reconstruct(m.decode_logits([o.token_ids for o in out], [o.positions for o in out]))
             for m, out in zip((model, twin), outs)]
    assert torch.equal(recon[0], recon[1])


def test_missing_or_extra_keys_are_reported_together(model, ema):
    sd = dict(ema)
    del sd["halting_mlp.2.bias"], sd["latent_tokens"]
    sd["gan_head.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatch) as err:
        check_state_dict(model, sd)
    assert err.value.missing == ["latent_tokens", "halting_mlp.2.bias"]
    assert err.value.unexpected == ["gan_head.weight"]
    with pytest.raises(RuntimeError):
        KARL(model.cfg).load_state_dict(sd, strict=True)


def test_quality_bins_are_chosen_in_float32(exp, ref_json):
    got = [quality_bin(float(q)) for q in exp["quality_probe_values"]]
    assert got == exp["quality_probe_bin_index"].tolist()
    assert quality_bin(0.005) == 0 and quality_bin(0.32) == 17 and quality_bin(0.5) == 18
    # the trap: the stored float32 bins compared with a float64 q pick the next bin up
    stored = ref_json["rec_loss_bins"]
    assert min(i for i, b in enumerate(stored) if b >= 0.005) == 1
    assert quality_bin(0.005, tuple(stored)) == 0


def test_ladder_and_probe_keys():
    lim = KARLLimits.of(PRESETS["karl_test_tiny"])
    assert lim.ladder(0.05, None, None, None) == [probe_key(256, 5)]
    assert lim.ladder(None, None, None, 64) == [probe_key(64, 0)]
    strict = KARLLimits.of(PRESETS["karl_test_tiny"], retry_stricter=True)
    assert strict.ladder(0.05, None, None, 128) == [probe_key(128, b) for b in (5, 4, 3, 2, 1, 0)]
    assert (lim.max_probes, strict.max_probes) == (1, 19)
    for budget in (16, 255, 512):
        for b in (0, 7, 18):
            assert split_probe(probe_key(budget, b)) == (budget, b)
    assert probe_key(256, 5) == 256 * 32 + 5
    assert lim.describe(probe_key(256, 5)) == {"budget": 256, "quality_bin": 0.05}
    assert lim.variant(True) == lim.variant(False) == "karl"


def test_budgets_and_sequences_are_checked():
    lim = KARLLimits.of(PRESETS["karl_test_tiny"])
    assert lim.check_budget("max_tokens", 16) == 16 and lim.check_budget("max_tokens", 512) == 512
    for bad in (15, 513, 0, True):
        with pytest.raises(TargetError) as err:
            lim.check_budget("max_tokens", bad)
        assert err.value.field == "max_tokens" and "16 to 512" in err.value.message
    lim.check_sequence(3, np.array([0, 5, 511]))
    lim.check_sequence(3, None)
    lim.check_sequence(0, np.array([], dtype=np.int64))  # a pass whose every latent halted decodes too
    for n in (513, 600):
        with pytest.raises(TargetError) as err:
            lim.check_sequence(n, None)
        assert err.value.field == "token_ids"
    for pos in ([0, 5], [0, 5, 5], [3, 2, 4], [-1, 0, 1], [0, 1, 512], [0.0, 1.0, 2.0]):
        with pytest.raises(TargetError) as err:
            lim.check_sequence(3, np.array(pos))
        assert err.value.field == "positions"


def test_an_image_gets_the_same_answer_alone_and_in_a_mixed_batch(model, images):
    probes = [probe_key(16, 0), probe_key(128, 9), probe_key(32, 18)]
    states = model.prepare(images[:3])
    batch = model.advance(states, probes, trace=True)
    logits = model.decode_logits([o.token_ids for o in batch], [o.positions for o in batch])
    for i, p in enumerate(probes):
        # the same prepared image: the single pass and its decode are bit-identical
        alone = model.advance([states[i]], [p], trace=True)[0]
        for key in ("halt_logit", "latent_ids", "encoder_out"):
            assert torch.equal(alone.trace[key], batch[i].trace[key]), key
        # decoded alone or packed with sequences of other lengths: float noise only (1e-6 of the scale)
        own = model.decode_logits([alone.token_ids], [alone.positions])[0]
        assert (own - logits[i]).abs().max() <= 1e-6 * logits[i].abs().max()
        assert torch.equal(own.argmax(-1), logits[i].argmax(-1))
        # from the pixels: the VQGAN's convolutions may round differently per batch size (~3e-6)
        fresh = model.advance(model.prepare(images[i : i + 1]), [p], trace=True)[0]
        assert torch.equal(fresh.token_ids, batch[i].token_ids) and torch.equal(fresh.positions, batch[i].positions)
        torch.testing.assert_close(fresh.trace["halt_logit"], batch[i].trace["halt_logit"], atol=1e-3, rtol=0)
    assert [s.iteration for s in states] == [2, 2, 2]  # one batched and one lone pass each


def test_dropped_tokens_must_keep_their_positions(model, images, exp):
    out = model.advance(model.prepare(images[:1]), [probe_key(256, 5)])[0]
    n = out.token_ids.shape[0]
    assert not torch.equal(out.positions, torch.arange(n))  # halting is scattered, not a suffix
    kept = model.decode_logits([out.token_ids], [out.positions]).argmax(-1)
    first_k = model.decode_logits([out.token_ids]).argmax(-1)  # positions 0..K-1: wrong
    np.testing.assert_array_equal(kept[0].numpy(), exp["T256_q050_logits_argmax"][0])
    assert (kept != first_k).sum() > 0
    # a pass whose every latent halted still decodes (the 2D queries alone)
    none = torch.zeros(0, dtype=torch.long)
    assert model.decode_logits([none, out.token_ids], [none, out.positions]).shape == (2, 256, 128)


def test_karl_small_preset_builds_with_released_shapes():
    cfg = PRESETS["karl_small"].validate()
    assert (cfg.encoder_width, cfg.encoder_layers, cfg.pos_grid, cfg.latent_rows) == (1024, 8, 64, 512)
    with torch.device("meta"):
        m = KARL(cfg)
    n = sum(p.numel() for p in m.parameters())
    assert 200e6 < n < 400e6, n
    assert tuple(m.encoder_positional_embedding.shape) == (1024, 64, 64)
    assert tuple(m.quantize.embedding.weight.shape) == (4096, 12)


def test_config_round_trips_and_is_strict(model, ema):
    cfg = model.cfg
    assert cfg == PRESETS["karl_test_tiny"]
    assert KARLConfig.from_dict(cfg.to_dict()) == cfg
    assert KARLConfig.from_reference_json(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ConfigError, match="bogus"):
        KARLConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    assert infer_config(ema, None) == cfg
    with pytest.raises(ValueError, match="heads"):
        infer_config({**ema, "encoder.transformer.2.ln_1.weight": torch.zeros(64)}, None)


def test_continuous_latent_variants_are_refused(ref_json, ema):
    d = json.loads(json.dumps(ref_json))
    d["karl_constructor_kwargs"]["quantize_latent"] = False
    with pytest.raises(ConfigError, match="token ids"):
        KARLConfig.from_reference_json(d)
    with pytest.raises(ConfigError, match="token ids"):
        check_weights({k: v for k, v in ema.items() if k != "quantize.embedding.weight"})


def test_convert_loads_back_with_the_same_fingerprint_and_the_loader_finds_the_family(tmp_path):
    from service.model.checkpoint import convert, load_model

    loaded = convert(FIXTURE / "checkpoint.pth", tmp_path / "out")
    again = load_model(tmp_path / "out")
    assert loaded.family.name == again.family.name == "karl"
    assert again.fingerprint == loaded.fingerprint == load_model(FIXTURE).fingerprint
    assert "| family | karl |" in (tmp_path / "out" / "MODEL_CARD.md").read_text()
    # without any config.json the family comes from the weights' keys and the shapes give the config
    bare = tmp_path / "bare" / "weights.safetensors"
    bare.parent.mkdir()
    bare.write_bytes((FIXTURE / "model.safetensors").read_bytes())
    inferred = load_model(bare, heads=2)
    assert inferred.family.name == "karl" and inferred.config.encoder_width == 64
