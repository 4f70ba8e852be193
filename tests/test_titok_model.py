"""The TiTok / One-D-Piece port: golden-fixture parity, checkpoint layouts, prefix rules, batching."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from service.engine.targets import Target, check_token_ids, parse_target
from service.model import registry
from service.model.checkpoint import CheckpointMismatch, check_state_dict, load_model
from service.model.config import ConfigError
from service.model.family import TargetError
from service.model.titok import FAMILY, PRESETS, TiTok, TiTokConfig, TiTokLimits, check_weights, infer_config
from service.verify_titok import verify_titok

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "one-d-piece-reference"


@pytest.fixture(scope="module")
def exp() -> dict[str, np.ndarray]:
    with np.load(FIXTURE / "expected.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def ref_json() -> dict:
    return json.loads((FIXTURE / "config.json").read_text())


@pytest.fixture(scope="module")
def sd_bin() -> dict[str, torch.Tensor]:
    return torch.load(FIXTURE / "pytorch_model.bin", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def model(ref_json, sd_bin) -> TiTok:
    m = TiTok(TiTokConfig.from_reference_json(ref_json))
    m.load_state_dict(sd_bin, strict=True)
    return m.eval()


@pytest.fixture(scope="module")
def images(exp) -> torch.Tensor:
    return torch.from_numpy(exp["input"])


@pytest.fixture()
def registered(monkeypatch):
    """TiTok in the registry for this test only (registry.py itself lists it elsewhere)."""
    monkeypatch.setitem(registry.FAMILIES, FAMILY.name, FAMILY)


def test_verify_passes_in_float32():
    report = verify_titok(FIXTURE)
    assert report.ok, report.table()
    names = {r.name for r in report.rows}
    assert {"encoder_out", "token_ids", "k01/logits_argmax", "k32/recon", "k64/pixel_code_full",
            "all_lengths/l1", "all_lengths/psnr_uint8", "batch/img3_alone_vs_packed_logits",
            "load/bin_vs_safetensors_recon_k16_k64", "load/eval_mode", "rng/nothing_drawn"} <= names
    assert all(r.compared > 0 for r in report.rows)
    token_row = next(r for r in report.rows if r.name == "token_ids")
    assert token_row.skipped == 1  # the fixture's one near-tie id (margin 3.9e-05)


def test_state_dict_names_and_shapes_match_the_reference(model):
    lines = [ln.split("\t") for ln in (FIXTURE / "keys.txt").read_text().splitlines() if not ln.startswith("#")]
    reference = {name: tuple(int(d) for d in shape.split("x")) for name, shape, _ in lines}
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == reference
    assert list(model.state_dict()) == list(reference)  # the reference's order too


def test_bin_and_safetensors_load_strictly_and_agree(model, ref_json, images):
    twin = TiTok(TiTokConfig.from_reference_json(ref_json))
    twin.load_state_dict(load_file(str(FIXTURE / "model.safetensors")), strict=True)
    twin.eval()
    outs = []
    for m in (model, twin):
        states = m.prepare(images[:2])
        steps = m.advance(states, [16, 64])
        recon = m.reconstruct(m.decode_logits([o.token_ids for o in steps]))
        outs.append((torch.stack([s.token_ids for s in states]), recon))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_missing_extra_and_misshapen_keys_are_reported_together(model, sd_bin):
    sd = dict(sd_bin)
    del sd["decoder.mask_token"], sd["pixel_decoder.up.1.block.0.nin_shortcut.weight"]
    sd["decoder.conv_out.weight"] = torch.zeros(1)
    sd["quantize.embedding.weight"] = torch.zeros(255, 12)
    with pytest.raises(CheckpointMismatch) as err:
        check_state_dict(model, sd)
    assert err.value.missing == ["decoder.mask_token", "pixel_decoder.up.1.block.0.nin_shortcut.weight"]
    assert err.value.unexpected == ["decoder.conv_out.weight"]
    assert err.value.wrong_shape == [("quantize.embedding.weight", (255, 12), (256, 12))]
    with pytest.raises(RuntimeError):
        TiTok(model.cfg).load_state_dict(sd, strict=True)


def test_one_d_piece_ladder_budgets_and_sequences():
    lim = TiTokLimits.of(PRESETS["one_d_piece_s256"])
    full = [32, 64, 96, 128, 160, 192, 224, 256]
    assert lim.ladder(0.05, None, None, None) == full
    assert lim.ladder(None, 25.0, None, 128) == [32, 64, 96, 128]
    assert lim.ladder(0.05, None, None, 100) == [32, 64, 96, 100]  # a cap off the grid ends the ladder
    assert lim.ladder(0.05, None, None, 20) == [20]
    assert lim.ladder(None, None, 7, None) == [7]
    assert (lim.max_probes, lim.token_buckets(), lim.max_tokens) == (8, tuple(full), 256)
    assert lim.describe(96) == {} and lim.positional is False and lim.family == "titok"
    assert lim.info() == {"num_latent_tokens": 256, "ladder_step": 32, "strict_length": False}
    assert set(lim.accepts) == {"max_l1", "min_psnr", "tokens", "max_tokens"}
    for ok in (1, 7, 256):
        assert lim.check_budget("tokens", ok) == ok
    for bad in (0, 257, -3, True, 2.5):
        with pytest.raises(TargetError) as err:
            lim.check_budget("max_tokens", bad)  # type: ignore[arg-type]
        assert err.value.field == "max_tokens" and "1 to 256" in err.value.message
    lim.check_sequence(1, None)
    lim.check_sequence(256, None)
    for n in (0, 257):
        with pytest.raises(TargetError) as err:
            lim.check_sequence(n, None)
        assert err.value.field == "token_ids"
    with pytest.raises(TargetError) as err:
        lim.check_sequence(3, np.array([0, 1, 2]))
    assert err.value.field == "positions"
    # through the engine's parsing
    t = parse_target({"max_l1": 0.1, "max_tokens": 40}, lim, Target(max_l1=0.05))
    assert t.ladder(lim) == [32, 40]
    assert parse_target({"tokens": 5}, lim, Target(max_l1=0.05)).ladder(lim) == [5]
    ids, pos = check_token_ids(list(range(10)), lim)
    assert ids.shape == (10,) and pos is None
    # the fixture's shape: 64 tokens, ladder 32, 64
    tiny = TiTokLimits.of(PRESETS["titok_test_tiny"])
    assert tiny.ladder(0.1, None, None, None) == [32, 64] and tiny.codebook_size == 256 and tiny.img_size == 64


def test_strict_length_titok_takes_only_its_full_sequence():
    lim = TiTokLimits.of(PRESETS["titok_l32"])
    assert lim.ladder(0.05, None, None, None) == [32] and lim.ladder(None, 30.0, None, 32) == [32]
    assert lim.ladder(None, None, 32, None) == [32]
    assert lim.max_probes == 1 and lim.token_buckets() == (32,)
    assert lim.info()["strict_length"] is True
    assert lim.check_budget("tokens", 32) == 32
    for bad in (1, 16, 31, 33):
        with pytest.raises(TargetError) as err:
            lim.check_budget("tokens", bad)
        assert "exactly 32" in err.value.message
    lim.check_sequence(32, None)
    with pytest.raises(TargetError) as err:
        lim.check_sequence(16, None)
    assert err.value.field == "token_ids" and "exactly 32" in err.value.message
    assert TiTokLimits.of(PRESETS["titok_s128"]).ladder(0.05, None, None, None) == [128]
    # the network refuses a prefix too, touching no state
    torch.manual_seed(0)
    m = TiTok(replace(PRESETS["titok_test_tiny"], strict_length=True)).eval()
    states = m.prepare(torch.rand(2, 3, 64, 64))
    with pytest.raises(ValueError, match="exactly 64"):
        m.advance(states, [64, 16])
    assert [s.iteration for s in states] == [0, 0]
    with pytest.raises(ValueError, match="exactly 64"):
        m.decode_logits([states[0].token_ids[:16]])
    assert m.decode_logits([o.token_ids for o in m.advance(states)]).shape == (2, 256, 128)


def test_a_prefix_decodes_the_same_alone_and_in_a_mixed_length_batch(model, images, exp):
    states = model.prepare(images[:3])
    probes = [1, 40, 64]
    outs = model.advance(states, probes)
    assert [o.probe for o in outs] == probes and [s.iteration for s in states] == [1, 1, 1]
    assert [model.step_weight(s, p) for s, p in zip(states, probes)] == [258, 297, 321]
    for o, s, k in zip(outs, states, probes):
        assert torch.equal(o.token_ids, s.token_ids[:k]) and o.positions is None
    batch = model.decode_logits([o.token_ids for o in outs])
    for i, o in enumerate(outs):
        alone = model.decode_logits([o.token_ids])[0]
        assert (alone - batch[i]).abs().max() <= 1e-4
        assert torch.equal(alone.argmax(-1), batch[i].argmax(-1))
    ladder = list(exp["ladder_lengths"])
    np.testing.assert_array_equal(batch[2].argmax(-1).numpy(), exp["logits_argmax"][ladder.index(64), 2])
    np.testing.assert_array_equal(batch[0].argmax(-1).numpy(), exp["logits_argmax"][ladder.index(1), 0])
    with pytest.raises(ValueError, match="positions"):
        model.decode_logits([outs[0].token_ids], [torch.zeros(1, dtype=torch.long)])
    for bad in (0, 65):
        with pytest.raises(ValueError, match="1 to 64"):
            model.advance(states[:1], [bad])


def test_legacy_reshape_follows_the_index_rule_when_width_differs_from_tokens():
    torch.manual_seed(1)
    cfg = replace(PRESETS["titok_test_tiny"], num_latent_tokens=32)  # W = 64, N = 32
    m = TiTok(cfg).eval()
    ids, trace = m.encode(torch.rand(2, 3, 64, 64))
    h = trace["ln_post"]  # (B, N, W)
    w, bias = m.encoder.conv_out.weight[:, :, 0, 0], m.encoder.conv_out.bias  # (D, W), (D,)
    assert bias is not None
    b, n_tok, width = h.shape
    flat = h.reshape(b, -1)
    # conv input (c, n) is flat element f = c*N + n: latent token f // W, channel f % W
    x = torch.stack([torch.stack([flat[:, c * n_tok + n] for n in range(n_tok)], -1) for c in range(width)], 1)
    want = torch.einsum("dc,bcn->bnd", w, x) + bias
    torch.testing.assert_close(trace["prequant"], want, atol=1e-5, rtol=1e-5)
    transposed = torch.einsum("dc,bnc->bnd", w, h) + bias  # a permute: not the reference
    assert (trace["prequant"] - transposed).abs().max() > 1e-2
    assert ids.shape == (2, 32)


def test_released_presets_build_with_the_reference_parameter_counts():
    counts = {"one_d_piece_s256": 83_871_247, "one_d_piece_b256": 205_256_463, "one_d_piece_l256": 641_742_863}
    for name, cfg in PRESETS.items():
        cfg.validate()
        with torch.device("meta"):
            m = TiTok(cfg)
        total = sum(p.numel() for p in m.parameters())
        assert infer_config(m.state_dict(), None) == cfg, name  # a released .bin alone: shapes + preset table
        if name == "titok_test_tiny":
            assert total == 728_655  # the fixture's state dict
            continue
        pixel = sum(p.numel() for k, p in m.named_parameters() if k.startswith("pixel_"))
        assert pixel == 30_740_483, name
        w, n = cfg.encoder_width, cfg.num_latent_tokens
        base = counts[f"one_d_piece_{name.split('_')[-1][0]}256"]  # the One-D-Piece of the same size
        assert total == base - 3 * (256 - n) * w, name  # latent tokens + 2 latent position tables
        assert tuple(m.latent_tokens.shape) == (n, w)
        assert tuple(m.quantize.embedding.weight.shape) == (4096, 12)
        assert tuple(m.state_dict()["decoder.ffn.2.weight"].shape) == (1024, 2 * w, 1, 1)
    assert [PRESETS[k].strict_length for k in ("one_d_piece_s256", "titok_s128", "titok_b64", "titok_l32")] == [
        False, True, True, True]
    assert [PRESETS[k].num_latent_tokens for k in ("titok_s128", "titok_b64", "titok_l32")] == [128, 64, 32]


def test_config_reads_the_reference_layout_and_round_trips(ref_json, sd_bin):
    cfg = TiTokConfig.from_reference_json(ref_json)
    assert cfg == PRESETS["titok_test_tiny"]
    assert TiTokConfig.from_dict(cfg.to_dict()) == cfg
    assert TiTokConfig.from_reference_json(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ConfigError, match="bogus"):
        TiTokConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(ConfigError, match="bogus"):
        TiTokConfig.from_dict({**cfg.to_dict(), "pixel_vqgan": {**cfg.to_dict()["pixel_vqgan"], "bogus": 1}})
    # a released yaml (no fixture overrides): the hard-coded sizes and MaskGIT pixel stage
    released = json.loads(json.dumps(ref_json))
    del released["model"]["fixture_overrides"]
    vq = released["model"]["vq_model"]
    vq.update(vit_enc_model_size="small", vit_dec_model_size="small", vit_enc_patch_size=16, vit_dec_patch_size=16,
              num_latent_tokens=256, codebook_size=4096)
    released["dataset"]["preprocessing"]["crop_size"] = 256
    assert TiTokConfig.from_reference_json(released) == PRESETS["one_d_piece_s256"]
    del vq["strict_length_assertion"]  # the TiTok configs: absent, so the reference's default (strict)
    vq.update(vit_enc_model_size="large", vit_dec_model_size="large", num_latent_tokens=32)
    assert TiTokConfig.from_reference_json(released) == PRESETS["titok_l32"]
    for key, value, match in (("finetune_decoder", False, "stage-1"), ("use_l2_norm", False, "use_l2_norm"),
                              ("vit_enc_model_size", "huge", "unknown"), ("is_legacy", False, "legacy"),
                              ("vit_dec_patch_size", 8, "patch")):
        bad = json.loads(json.dumps(released))
        bad["model"]["vq_model"][key] = value
        with pytest.raises(ConfigError, match=match):
            TiTokConfig.from_reference_json(bad)
    # from the weights alone: the preset of the same shape (its heads and strictness)
    assert infer_config(sd_bin, None) == cfg
    with pytest.raises(ConfigError, match="heads"):
        infer_config({**sd_bin, "encoder.transformer.2.ln_1.weight": torch.zeros(64)}, None)
    with pytest.raises(ConfigError, match="stage-1"):
        check_weights({k: v for k, v in sd_bin.items() if not k.startswith("pixel_decoder.")})


def test_loaded_model_is_in_eval_mode_and_draws_nothing(registered, sd_bin, images, exp):
    assert FAMILY.marker in sd_bin
    assert all(f.marker not in sd_bin for f in registry.FAMILIES.values() if f.name != "titok")
    assert registry.family_of_state_dict(sd_bin).name == "titok"
    assert registry.family_of_fixture(FIXTURE).name == "titok"
    for src in (FIXTURE, FIXTURE / "pytorch_model.bin"):  # config.json + safetensors; the released pickle
        loaded = load_model(src)
        assert loaded.family.name == "titok" and loaded.config == PRESETS["titok_test_tiny"]
        assert loaded.model.training is False
    m = loaded.model
    rng = torch.get_rng_state()
    states = m.prepare(images[:2])
    logits = m.decode_logits([o.token_ids for o in m.advance(states, [16, 16])])
    m.reconstruct(logits)
    assert torch.equal(rng, torch.get_rng_state())  # nothing drawn
    # even in training mode (where the reference draws a random prefix length), a prefix is a prefix
    m.train()
    try:
        again = m.decode_logits([o.token_ids for o in m.advance(states, [16, 16])])
    finally:
        m.eval()
    assert torch.equal(logits, again) and torch.equal(rng, torch.get_rng_state())
    k16 = list(exp["ladder_lengths"]).index(16)
    np.testing.assert_array_equal(logits.argmax(-1).numpy(), exp["logits_argmax"][k16, :2])


def test_loader_convert_and_verify_dispatch_find_the_family(registered, tmp_path):
    from service.model.checkpoint import convert

    loaded = convert(FIXTURE / "pytorch_model.bin", tmp_path / "out")
    again = load_model(tmp_path / "out")
    assert loaded.family.name == again.family.name == "titok"
    assert again.fingerprint == loaded.fingerprint == load_model(FIXTURE).fingerprint
    assert json.loads((tmp_path / "out" / "config.json").read_text())["family"] == "titok"
    assert "| family | titok |" in (tmp_path / "out" / "MODEL_CARD.md").read_text()
    # without any config.json: the family from the marker key, the configuration from the shapes
    bare = tmp_path / "bare" / "weights.safetensors"
    bare.parent.mkdir()
    bare.write_bytes((FIXTURE / "model.safetensors").read_bytes())
    assert load_model(bare).config == PRESETS["titok_test_tiny"]
    assert registry.preset("titok_test_tiny")[0].name == "titok"
    module, _, fn = registry.family_of_fixture(FIXTURE).verifier.partition(":")
    assert (module, fn) == ("service.verify_titok", "verify_titok")  # how `alit-serve verify` dispatches


def test_reference_preprocessing_is_bilinear_not_the_service_bicubic(exp):
    """What the service's preprocessing needs for this family: the same steps with PIL BILINEAR."""
    from PIL import Image

    from service.imaging import center_crop, preprocess, to_tensor

    differs = 0
    for name, want in zip(exp["image_names"], exp["input"]):
        img = Image.open(FIXTURE / "images" / str(name)).convert("RGB")
        w, h = img.size
        size = (64, int(64 * h / w)) if w <= h else (int(64 * w / h), 64)
        resized = img.resize(size, Image.Resampling.BILINEAR) if size != img.size else img
        assert torch.equal(to_tensor(center_crop(resized, 64)), torch.from_numpy(want)), name
        differs += not torch.equal(preprocess(img, 64), torch.from_numpy(want))  # the service's bicubic
    assert differs == len(exp["input"])


def test_the_engine_walks_prefix_ladders_and_answers_as_the_fixture_tables_say(registered, images, exp):
    import asyncio

    from service.engine import Engine, EngineSettings

    loaded = load_model(FIXTURE)
    targets = [Target(max_l1=0.4), Target(tokens=5), Target(min_psnr=9.0, max_tokens=48), Target(max_l1=0.34)]
    jobs = [(i % 7, targets[i % len(targets)]) for i in range(14)]

    async def go():
        eng = Engine(loaded, EngineSettings(devices="cpu", halting=False, warmup=False, max_batch=8)).start()
        try:
            return await asyncio.gather(*[eng.tokenize(images[b], t) for b, t in jobs])
        finally:
            eng.shutdown()

    lim = loaded.model.limits
    for (b, t), r in zip(jobs, asyncio.run(go())):
        if t.tokens is not None:
            want, met = t.tokens, True
        else:  # the first prefix on the ladder meeting the target, else the best (from the fixture's tables)
            quality_of = {k: (exp["l1"][k - 1, b], exp["psnr"][k - 1, b]) for k in t.ladder(lim)}
            hits = [k for k, q in quality_of.items() if t.met(*q)]
            score = {k: -q[1] if t.max_l1 is None else q[0] for k, q in quality_of.items()}  # lower is better
            want, met = (hits[0], True) if hits else (min(score, key=score.__getitem__), False)
        assert (r.selected_iteration, r.num_tokens, r.target_met) == (want, want, met), (b, t)
        np.testing.assert_array_equal(r.token_ids, exp["token_ids"][b, :want])


def test_images_at_different_prefix_lengths_share_each_step_and_answer_as_alone(registered, images):
    """The packed step: images at different probe lengths go through one decoder call and one pixel
    decode per step, and each image's answer is the one it gets alone."""
    import asyncio

    from service.engine import Engine, EngineSettings

    loaded = load_model(FIXTURE)
    m = loaded.model
    calls: list[list[int]] = []
    pixel_calls: list[int] = []
    decode_logits, reconstruct = m.decode_logits, m.reconstruct

    def spy_logits(token_ids, positions=None):
        calls.append([int(t.shape[0]) for t in token_ids])
        return decode_logits(token_ids, positions)

    def spy_pixels(logits):
        pixel_calls.append(int(logits.shape[0]))
        return reconstruct(logits)

    m.decode_logits, m.reconstruct = spy_logits, spy_pixels  # type: ignore[method-assign]
    # ladders [32, 64], [20], [32, 48], [32, 64]; an exact budget probes once and measures nothing
    targets = [Target(max_l1=0.01), Target(max_l1=0.01, max_tokens=20), Target(max_l1=0.34, max_tokens=48),
               Target(tokens=40), Target(max_l1=0.4)]
    jobs = [(i % 7, parse_target(vars(targets[i % len(targets)]), m.limits, Target(max_l1=0.07))) for i in range(12)]

    async def run(batch):
        eng = Engine(loaded, EngineSettings(devices="cpu", halting=False, warmup=False, max_batch=16)).start()
        try:
            return await asyncio.gather(*[eng.tokenize(images[b], t) for b, t in batch])
        finally:
            eng.shutdown()

    together = asyncio.run(run(jobs))
    mixed = [c for c in calls if len(set(c)) > 1]
    assert mixed, calls  # some step decoded several lengths in one call
    assert len(calls) < sum(r.iterations for r in together)  # probes shared calls
    assert len(pixel_calls) <= len(calls) and sum(pixel_calls) <= sum(map(len, calls))
    for (b, t), r in zip(jobs, together):
        (alone,) = asyncio.run(run([(b, t)]))
        assert (alone.selected_iteration, alone.target_met, alone.iterations) == (r.selected_iteration, r.target_met,
                                                                                  r.iterations), (b, t)
        np.testing.assert_array_equal(alone.token_ids, r.token_ids)
        assert (alone.l1 is None) == (r.l1 is None) and (r.l1 is None or abs(alone.l1 - r.l1) <= 1e-5)


def test_the_released_layout_a_bin_beside_the_reference_yaml_loads(registered, ref_json, tmp_path):
    """The released layout: `pytorch_model.bin` next to the repository's yaml config (no config.json)
    loads strictly with the same configuration and fingerprint as the fixture; an ambiguous or broken
    yaml is one clear error."""
    import shutil

    import yaml

    from service.model.checkpoint import CheckpointError

    folder = tmp_path / "odp"
    folder.mkdir()
    shutil.copy(FIXTURE / "pytorch_model.bin", folder / "pytorch_model.bin")
    (folder / "one-d-piece_w64.yaml").write_text(yaml.safe_dump(ref_json))
    want = load_model(FIXTURE)
    got = load_model(folder)
    assert got.config == want.config and got.fingerprint == want.fingerprint
    (folder / "other.yml").write_text("model: {}\n")
    with pytest.raises(CheckpointError, match="several yaml configs.*one-d-piece_w64.yaml.*other.yml"):
        load_model(folder)
    (folder / "other.yml").unlink()
    (folder / "one-d-piece_w64.yaml").write_text("model: [unclosed\n")
    with pytest.raises(CheckpointError, match="cannot read config"):
        load_model(folder / "pytorch_model.bin")
