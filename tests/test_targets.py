"""Target validation: clear messages naming the field."""

from __future__ import annotations

import pytest

from service.engine import Target, TargetError, check_token_ids, parse_target
from service.model.alit import ALITLimits

L = ALITLimits(tokens_per_iter=32, max_iters=8, codebook=256)
DEFAULT = Target(max_l1=0.07)


def test_valid_targets():
    assert parse_target(None, L, DEFAULT) == DEFAULT
    assert parse_target({"max_l1": 0.1}, L, DEFAULT) == Target(max_l1=0.1)
    assert parse_target({"tokens": 64}, L, DEFAULT).ladder(L) == [1, 2]  # an exact budget answers with its last
    assert parse_target({"max_tokens": 128}, L, DEFAULT) == Target(max_l1=0.07, max_tokens=128)
    assert parse_target({"min_psnr": 30, "max_tokens": 96}, L, DEFAULT).ladder(L) == [1, 2, 3]
    assert parse_target({"max_l1": None, "tokens": 32.0}, L, DEFAULT) == Target(tokens=32)


@pytest.mark.parametrize("spec,field,fragment", [
    ({"max_l1": 0}, "max_l1", "(0.0, 1.0]"),
    ({"max_l1": 1.5}, "max_l1", "(0.0, 1.0]"),
    ({"max_l1": "a"}, "max_l1", "finite number"),
    ({"max_l1": float("nan")}, "max_l1", "finite number"),
    ({"min_psnr": -3}, "min_psnr", "(0.0, 100.0]"),
    ({"tokens": 33}, "tokens", "multiple of 32"),
    ({"tokens": 288}, "tokens", "between 32 and 256"),
    ({"tokens": 0}, "tokens", "multiple of 32"),
    ({"tokens": True}, "tokens", "integer"),
    ({"max_tokens": 40}, "max_tokens", "multiple of 32"),
    ({"tokens": 64, "max_l1": 0.1}, "tokens", "cannot be combined with max_l1"),
    ({"tokens": 64, "max_tokens": 128}, "tokens", "cannot be combined with max_tokens"),
    ({"quality": 3}, "quality", "unknown target field"),
])
def test_invalid_targets_name_the_field(spec, field, fragment):
    with pytest.raises(TargetError) as e:
        parse_target(spec, L, DEFAULT)
    assert e.value.field == field and fragment in e.value.message


def test_max_tokens_with_a_budget_default_is_rejected():
    with pytest.raises(TargetError, match="needs max_l1 or min_psnr"):
        parse_target({"max_tokens": 64}, L, Target(tokens=128))


def test_met_and_better():
    t = Target(max_l1=0.1, min_psnr=20)
    assert t.met(0.05, 25) and not t.met(0.05, 15) and not t.met(0.2, 25)
    assert Target(min_psnr=20).better(0.5, 21, 0.1, 20)  # PSNR-only: higher PSNR wins
    assert Target(max_l1=0.1).better(0.09, 1, 0.1, 50)


@pytest.mark.parametrize("ids,fragment", [
    ([], "length must be a multiple of 32"),
    (list(range(33)), "length must be a multiple of 32"),
    ([0] * 288, "between 32 and 256"),
    ([0] * 31 + [256], "ids must be in [0, 255]"),
    ([0] * 31 + [-1], "ids must be in [0, 255]"),
    ([0.5] * 32, "flat list of integers"),
    ([[0] * 32], "flat list of integers"),
    (["a"] * 32, "flat list of integers"),
])
def test_token_id_validation(ids, fragment):
    with pytest.raises(TargetError) as e:
        check_token_ids(ids, L)
    assert e.value.field == "token_ids" and fragment in e.value.message


def test_token_ids_ok():
    ids, positions = check_token_ids(list(range(64)), L)
    assert ids.shape == (64,) and positions is None
