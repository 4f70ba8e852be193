"""Training on any device (issue 25, item 1), the parts that do not need a GPU: bfloat16 autocast
runs every stage, checkpoints hold CPU tensors, the wall-clock plan's arithmetic, and the whole
budgeted job (`gpu-job`) end to end on the CPU, resumed without re-planning."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from service.model.alit import ALIT
from service.model.presets import get_preset
from service.training import budget
from service.training.common import load_state, resolve_device, use_bf16


def _pool(n: int = 6, size: int = 64, seed: int = 0) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=g)
    x = torch.nn.functional.interpolate(low, size=size, mode="bilinear", align_corners=False)
    return (x.permute(0, 2, 3, 1).clamp(0, 1).numpy() * 255).astype(np.uint8)


def _logs(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_device_and_precision_choices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("mps:0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="requested but torch sees 0 CUDA devices"):
            resolve_device("cuda")
    assert use_bf16(torch.device("cpu")) is False  # auto: bfloat16 only on CUDA
    assert use_bf16(torch.device("cuda")) is True
    assert use_bf16(torch.device("cpu"), "on") is True
    with pytest.raises(ValueError):
        use_bf16(torch.device("cpu"), "maybe")


def test_every_stage_trains_under_bf16_autocast_and_checkpoints_on_the_cpu(tmp_path):
    """The autocast paths (what a GPU run takes) run on the CPU: losses finite, nearest-code searches
    in float32, checkpoints written with CPU tensors only (so they resume on either device)."""
    from service.training.stage1 import train_vqgan
    from service.training.stage2 import Stage2Params, train_latents
    from service.training.stage3 import finetune_decoder

    cfg = get_preset("test_tiny")
    pool = _pool()
    vq = train_vqgan(tmp_path, cfg.vqgan, pool, steps=2, batch=2, lr=1e-3, seed=0, quiet=True, log_every=1,
                     device="cpu", bf16=True)
    torch.manual_seed(0)
    model = ALIT(cfg)
    model.vqgan.load_state_dict(vq.state_dict())
    # phase A (quantiser bypassed), the switch-on step, phase B with every iteration unrolled
    P = Stage2Params(steps=3, a_steps=1, a_batch=2, b_batch=2, p_full=1.0, eval_every=3, ckpt_every=3, pix_all=True)
    model = train_latents(tmp_path, model, pool, P, seed=0, quiet=True, eval_images=torch.rand(2, 3, 64, 64),
                          device="cpu", bf16=True)
    finetune_decoder(tmp_path, model, pool, steps=1, batch=2, lr=1e-4, seed=0, quiet=True, device="cpu", bf16=True)
    for name in ("stage1", "stage2", "stage3"):
        rows = _logs(tmp_path / f"{name}.log.jsonl")
        assert all(math.isfinite(v) for r in rows for k, v in r.items() if isinstance(v, float)), name
        state = load_state(tmp_path / f"{name}.pt")
        tensors = [t for part in state.values() if isinstance(part, dict) for t in part.values()
                   if isinstance(t, torch.Tensor)]
        assert tensors and all(t.device.type == "cpu" for t in tensors), name
    assert _logs(tmp_path / "stage2.log.jsonl")[-1]["heldout_l1"]  # the evaluation ran under the same device code


def test_plan_arithmetic():
    # images/s: 16 -> 160, 32 -> 291 (+82 %), 64 -> 305 (+5 %: not worth it)
    assert budget.choose_batch({16: 0.1, 32: 0.11, 64: 0.21}) == 32
    assert budget.choose_batch({8: 1.0}) == 8
    assert budget.batch_candidates(16, torch.device("cpu")) == [16]
    assert budget.batch_candidates(16, torch.device("cuda"), limit=128) == [16, 32, 64, 128]
    assert budget.scaled_lr(1e-3, 64, 16) == pytest.approx(2e-3)
    assert budget.scaled_lr(1e-3, 32, 16) == pytest.approx(1e-3 * 2**0.5)
    assert budget.steps_for(60.0, 0.5) == 120
    assert budget.steps_for(1.0, 0.5) == budget.MIN_STEPS
    s = budget.shares(600.0, spent_seconds=20.0)
    assert sum(s.values()) == pytest.approx(600 * (1 - budget.RESERVE) - 20)
    assert s["stage1"] == pytest.approx(budget.SHARES["stage1"] * sum(s.values()))


def test_gpu_job_on_the_cpu_plans_trains_exports_and_resumes_without_replanning(tmp_path):
    """`gpu-job` end to end at toy scale: the crop pool from two worker processes, a plan from
    measured step times, every stage, a strictly loadable export with metrics; run again, it reads
    its plan, trains nothing more and exports the same weights."""
    from service.model.checkpoint import load_model
    from service.training import main

    run = tmp_path / "run"
    argv = ["gpu-job", "--quick", "--config", "default", "--device", "cpu", "--threads", "1",
            "--budget-minutes", "0.25", "--data-workers", "2", "--run", str(run), "--quiet"]
    assert main(argv) == 0
    plan = json.loads((run / "plan.json").read_text())
    assert plan["device"] == "cpu" and plan["budget_seconds"] == 15
    for name in ("stage1", "stage2a", "stage2", "stage2b", "stage3"):
        st = plan["stages"][name]
        assert st["steps"] >= budget.MIN_STEPS and st["seconds_per_step"] > 0
        assert list(st["probed"]) == [str(st["batch"])]  # CPU: the recipe's batch only
    recipe = json.loads((run / "recipe.json").read_text())
    assert recipe["s1_steps"] == plan["stages"]["stage1"]["steps"]
    assert recipe["s2"]["steps"] == plan["a_steps"] + plan["stages"]["stage2"]["steps"]
    assert recipe["s2c"]["steps"] == 0 and recipe["device"] == "cpu" and recipe["bf16"] is False
    assert _logs(run / "stage1.log.jsonl")[-1]["step"] == plan["stages"]["stage1"]["steps"]
    assert list(run.glob("pool_*_w2.npy"))  # made by two workers, cached
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["budget_seconds"] == 15 and len(metrics["heldout_photos"]["mean_l1"]) == 8
    first = load_model(run / "export")
    plan_text = (run / "plan.json").read_text()

    assert main(argv) == 0  # resumed: same plan, every stage already complete
    assert (run / "plan.json").read_text() == plan_text
    assert _logs(run / "stage1.log.jsonl")[-1]["step"] == plan["stages"]["stage1"]["steps"]
    assert load_model(run / "export").fingerprint == first.fingerprint


def test_training_refuses_a_bad_budget_or_device(capsys):
    from service.training import main

    assert main(["train", "--budget-minutes", "0", "--run", "/nonexistent/x"]) == 2
    assert "--budget-minutes must be positive" in capsys.readouterr().err
    assert main(["train", "--device", "tpu", "--run", "/nonexistent/x"]) == 2
    assert "unknown device" in capsys.readouterr().err


def test_probing_caps_the_doublings_not_the_warm_up(monkeypatch):
    """The first candidate's run carries the device's warm-up and does not count against the cap;
    the doublings after it stop once they have taken `max_seconds`."""
    clock = [0.0]
    step_cost = {16: 50.0, 32: 3.0, 64: 3.0, 128: 3.0, 256: 3.0}  # seconds each probe takes (16: warm-up)

    def fake_time_steps(run, batch, measured=4):
        clock[0] += step_cost[batch]
        return 0.1  # flat step time: every doubling pays
    monkeypatch.setattr(budget, "time_steps", fake_time_steps)
    monkeypatch.setattr(budget, "monotonic", lambda: clock[0])
    got = budget.probe(lambda *a: None, 16, torch.device("cuda"), limit=256, max_seconds=5.0)
    assert list(got) == [16, 32, 64]  # 32 after 3 s, 64 after 6 s > 5: stop
    clock[0] = 0.0
    assert list(budget.probe(lambda *a: None, 16, torch.device("cuda"), limit=256)) == [16, 32, 64, 128, 256]
