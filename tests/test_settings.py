"""The service's settings (`service/settings.py`): ALIT_* variables, defaults, validation, and the
overrides the Triton model applies from config.pbtxt."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from conftest import ROOT
from service.settings import DEFAULT_MODEL, Settings, engine_settings, settings_with


def test_the_default_model_is_the_shipped_weights(clean_env):
    assert (ROOT / "service" / "weights" / "model.safetensors").is_file()
    assert DEFAULT_MODEL == str(ROOT / "service" / "weights")
    assert Settings().model == DEFAULT_MODEL


def test_environment_variables_set_fields_and_are_validated(clean_env):
    clean_env.setenv("ALIT_MAX_BATCH", "7")
    clean_env.setenv("ALIT_HALTING", "false")
    clean_env.setenv("ALIT_DEFAULT_MAX_L1", "0.2")
    s = Settings()
    assert (s.max_batch, s.halting, s.default_max_l1) == (7, False, 0.2)
    clean_env.setenv("ALIT_MAX_BATCH", "0")
    with pytest.raises(ValidationError, match="max_batch"):
        Settings()
    clean_env.setenv("ALIT_MAX_BATCH", "4")
    clean_env.setenv("ALIT_ENGINE", "remote")
    with pytest.raises(ValidationError, match="engine"):
        Settings()


def test_engine_settings_carry_every_engine_field(clean_env):
    s = Settings(max_batch=5, max_queue=9, batch_mode="padded", halting=False, dtype="bfloat16", warmup=False,
                 devices="cpu")
    e = engine_settings(s)
    assert (e.devices, e.max_batch, e.max_queue, e.batch_mode, e.halting, e.dtype, e.warmup) == \
        ("cpu", 5, 9, "padded", False, "bfloat16", False)
    assert engine_settings(s, devices="cuda:1").devices == "cuda:1"


def test_overrides_beat_the_environment_and_empty_ones_do_not(clean_env):
    """config.pbtxt parameters for the Triton model: non-empty ones override, empty ones leave the
    ALIT_* variable or the default (the shipped weights, as `alit-serve serve` uses)."""
    clean_env.setenv("ALIT_MAX_BATCH", "7")
    s = settings_with({"model": "", "max_batch": "", "halting": "", "default_max_l1": ""})
    assert (s.model, s.max_batch, s.halting, s.default_max_l1) == (DEFAULT_MODEL, 7, True, 0.07)
    s = settings_with({"model": "preset:test_tiny", "max_batch": "3", "halting": "false"})
    assert (s.model, s.max_batch, s.halting) == ("preset:test_tiny", 3, False)


def test_unknown_or_invalid_overrides_are_refused(clean_env):
    with pytest.raises(ValueError, match="max_batches: not a setting"):
        settings_with({"max_batches": "3"})
    with pytest.raises(ValidationError, match="max_batch"):
        settings_with({"max_batch": "many"})
