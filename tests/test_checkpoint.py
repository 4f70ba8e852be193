"""Checkpoint loading: published layouts, safetensors, refusal of code, clear mismatch errors."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from service.model.checkpoint import (
    CheckpointError,
    CheckpointMismatch,
    convert,
    infer_config,
    load_model,
    read_state_dict,
)
from service.model.presets import get_preset


def _ema(fixture_dir):
    return torch.load(fixture_dir / "checkpoint.pth", map_location="cpu", weights_only=True)["ema"]


class WritesAFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_payload_is_refused_and_never_runs(tmp_path, fixture_dir):
    target = tmp_path / "pwned.txt"
    bad = tmp_path / "evil.pth"
    torch.save({"ema": _ema(fixture_dir), "payload": WritesAFile(str(target))}, bad)
    assert not target.exists()
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_model(bad)
    assert not target.exists()


def test_mismatch_names_missing_unexpected_and_wrong_shape(tmp_path, fixture_dir):
    sd = dict(_ema(fixture_dir))
    del sd["encoder_ln_post.weight"]
    sd["encoder.extra_head.weight"] = torch.zeros(3)
    sd["pre_quantizer_mlp.bias"] = torch.zeros(13)
    torch.save({"ema": sd}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointMismatch) as e:
        load_model(tmp_path / "bad.pth", config=get_preset("test_tiny"))
    msg = str(e.value)
    assert "missing keys (1): encoder_ln_post.weight" in msg
    assert "unexpected keys (1): encoder.extra_head.weight" in msg
    assert "pre_quantizer_mlp.bias (checkpoint [13], model [12])" in msg


def test_published_layouts_load_and_agree(tmp_path, fixture_dir):
    ema = _ema(fixture_dir)
    gan = {"gan_losses.0.discriminator.main.0.weight": torch.zeros(4), "gan_losses.7.perceptual_loss.net.w": torch.ones(2)}
    variants = {
        "full.pth": {"ema": {**ema, **gan}, "model": {**ema, **gan}, "epoch": 3, "optimizer": {"lr": 1e-4}},
        "model_only.pth": {"model": ema},
        "bare.pth": ema,
        "ddp.pth": {"ema": {f"module.{k}": v for k, v in ema.items()}},
    }
    prints = set()
    for name, obj in variants.items():
        torch.save(obj, tmp_path / name)  # no config.json beside: the config is inferred
        prints.add(load_model(tmp_path / name).fingerprint)
    st = load_model(fixture_dir / "model.safetensors")
    prints.add(st.fingerprint)
    assert len(prints) == 1


def test_inferred_config_equals_the_fixture_config(fixture_dir):
    from service.model.checkpoint import read_config_file

    assert infer_config(read_state_dict(fixture_dir / "checkpoint.pth")) == read_config_file(fixture_dir / "config.json")


def test_unknown_width_needs_heads(fixture_dir, tmp_path):
    cfg = get_preset("test_tiny")
    sd = {k: v for k, v in _ema(fixture_dir).items()}
    sd["encoder.transformer.2.ln_1.weight"] = torch.ones(64)  # a third layer: no preset has 64 x 3
    with pytest.raises(CheckpointError, match="heads"):
        infer_config(sd)
    assert infer_config(sd, heads=4).encoder_heads == 4
    assert cfg.encoder_layers == 2


def test_convert_writes_safetensors_config_and_card(tmp_path, fixture_dir):
    src = tmp_path / "in" / "alit.pth"
    src.parent.mkdir()
    shutil.copy(fixture_dir / "checkpoint.pth", src)
    loaded = convert(src, tmp_path / "out")
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json", "MODEL_CARD.md"}
    again = load_model(out)
    assert again.fingerprint == loaded.fingerprint
    assert json.loads((out / "config.json").read_text())["vqgan"]["ch_mult"] == [1, 1, 2]
    assert loaded.fingerprint in (out / "MODEL_CARD.md").read_text()


def test_fingerprint_changes_with_one_weight(tmp_path, fixture_dir):
    sd = dict(_ema(fixture_dir))
    sd["latent_tokens"] = sd["latent_tokens"].clone()
    sd["latent_tokens"][0, 0] += 1e-3
    save_file(sd, str(tmp_path / "model.safetensors"))
    shutil.copy(fixture_dir / "config.json", tmp_path / "config.json")
    assert load_model(tmp_path).fingerprint != load_model(fixture_dir / "model.safetensors").fingerprint


def test_missing_and_garbage_files_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(os.urandom(100))
    with pytest.raises(CheckpointError, match="cannot read"):
        load_model(tmp_path / "junk.pth", config=get_preset("test_tiny"))
