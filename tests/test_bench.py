"""The benchmark's pieces: the simulated GPU (the scheduler's core promise, on a virtual clock),
the cost-curve admission rule, and `alit-serve bench` end to end on a tiny run."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from conftest import run_cli
from pydantic import ValidationError

from service.bench import DEFAULT_IMAGES, simulate, workload
from service.engine import Engine, EngineSettings, Target
from service.engine.admission import CostCurve, admission_mode
from service.engine.policies import (CPU_REFILL_AT, Continuous, Lockstep, Reference, make_policy, refill_point,
                                     refill_setting)
from service.model.alit import ALITLimits
from service.model.registry import resolve
from service.settings import Settings


@pytest.fixture(scope="module")
def measured():
    """The shipped model's own halting on the fixture photos and crops of them (the benchmark's corpus)."""
    loaded = resolve("service/weights")
    cfg = loaded.config
    limits = ALITLimits(cfg.tokens_per_iter, cfg.max_iters)
    pixels = workload.tensors(workload.corpus(workload.load_folder(DEFAULT_IMAGES), 16), cfg.img_size)
    l1, psnr = workload.measure_iterations(loaded.model, pixels, halting=True)
    targets = workload.calibrate_targets(l1, psnr, limits)
    return workload.requests(1500, len(pixels), targets, l1, psnr, limits, seed=4), limits


def test_simulated_gpu_continuous_beats_lockstep_beats_reference(measured):
    """On a GPU-like device (a step costs the same for 1..32 images), continuous batching must give
    more throughput than lock-step, and a lower p50 and p99 at 70 % of lock-step's capacity."""
    reqs, limits = measured
    r = simulate.compare(reqs, limits, saturation=32, n_poisson=1500)
    ref, lock, cont = (r[n] for n in ("reference", "lockstep", "continuous"))
    assert cont["saturation_throughput"] > lock["saturation_throughput"] > ref["saturation_throughput"]
    # encoding ahead in batches keeps the VQGAN encode out of most steps (1.08x before it, 1.59x with it)
    assert cont["saturation_throughput"] >= 1.4 * lock["saturation_throughput"]
    assert cont["p99_at_70pct_lockstep_load"] < lock["p99_at_70pct_lockstep_load"]
    assert cont["p50_at_70pct_lockstep_load"] < lock["p50_at_70pct_lockstep_load"]


def test_simulation_halts_each_request_where_the_model_does(measured):
    reqs, limits = measured
    costs = simulate.SimCosts(saturation=32)
    got = simulate.simulate("continuous", reqs[:200], [0.0] * 200, limits, costs, max_batch=32)
    expected = sum(r.halts_at for r in reqs[:200]) / 200
    assert got["mean_iterations"] == pytest.approx(expected)


def test_cost_curve_knee_is_where_per_image_cost_stops_falling():
    gpu_like = CostCurve({1: 0.01, 2: 0.01, 4: 0.01, 8: 0.011, 16: 0.012, 32: 0.02})
    assert gpu_like.knee() == 32
    cpu_like = CostCurve({1: 0.02, 2: 0.03, 4: 0.05, 8: 0.09, 16: 0.18, 32: 0.36})
    assert cpu_like.knee() == 8  # 11.25 ms per image from 8 on; 12.5 at 4 is more than 10 % above


def test_policies_admit_as_their_strategy_says():
    c = make_policy("continuous", 32)
    assert isinstance(c, Continuous) and c.capacity(20) == 12
    c.calibrate(16)
    assert c.capacity(10) == 6 and c.capacity(16) == 0
    lk = make_policy("lockstep", 32, 0.02)
    assert isinstance(lk, Lockstep) and lk.capacity(0) == 32 and lk.capacity(1) == 0 and lk.fill_wait == 0.02
    assert isinstance(make_policy("reference", 32), Reference) and Reference().capacity(0) == 1
    # what to take from the queue: continuous batching encodes ahead (a full limit once the encoded
    # images cannot fill the free slots), the baselines take just what fills their slots
    assert c.to_take(active=10, ready=2) == 14 and c.to_take(active=10, ready=6) == 0
    assert lk.to_take(0, 0) == 32 and lk.to_take(5, 0) == 0 and Reference().to_take(0, 0) == 1
    # saturated (a full batch or more waiting), continuous batching with refill_at < 1 admits in cohorts:
    # nothing until the running images are down to refill_at x the limit, then every free slot
    r = make_policy("continuous", 32, refill_at=0.5)
    assert isinstance(r, Continuous) and r.capacity(20, backlog=40) == 0 and r.capacity(16, backlog=40) == 16
    assert r.capacity(20, backlog=31) == 12  # below saturation: every free slot at once, as refill_at=1
    assert r.to_take(active=20, ready=0, waiting=100) == 0 and r.to_take(active=16, ready=0, waiting=100) == 32
    assert make_policy("continuous", 32).capacity(20, backlog=1000) == 12  # refill_at 1: every slot at once
    with pytest.raises(ValueError, match="unknown scheduling policy"):
        make_policy("fifo", 32)


def test_saturated_admission_refills_at_a_quarter_on_a_cpu_and_lifts_the_measured_cap():
    """ALIT_REFILL_AT=auto (the default) resolves per worker device; a number is taken as given; anything
    else is refused with its name, by the setting and by the bench's flag alike."""
    assert Settings().refill_at == "auto"
    assert refill_point("auto", "cpu") == CPU_REFILL_AT == 0.25 and refill_point("auto", "cuda:0") == 1.0
    assert refill_point(0.5, "cuda:1") == 0.5 and refill_point(1.0, "cpu") == 1.0
    assert Settings(refill_at="0.5").refill_at == 0.5 and Settings(refill_at="AUTO").refill_at == "auto"
    for bad in ("0", "1.5", "half", "-1"):
        with pytest.raises(ValidationError, match="refill_at"):
            Settings(refill_at=bad)
        with pytest.raises(ValueError, match="refill_at"):
            refill_setting(bad)
    q = make_policy("continuous", 32, refill_at=refill_point("auto", "cpu"))  # what a CPU worker runs
    assert q.capacity(9, backlog=1000) == 0 and q.capacity(8, backlog=1000) == 24  # saturated: a cohort at 8 left
    assert q.capacity(9, backlog=10) == 23  # below saturation: every free slot at once
    m = make_policy("continuous", 32, refill_at=0.25)
    m.calibrate(8)  # ALIT_ADMISSION=measured: at most 8 in flight below saturation, the whole batch when saturated
    assert m.capacity(5, backlog=10) == 3 and m.capacity(8, backlog=31) == 0 and m.to_take(5, 0, 10) == 8
    assert m.capacity(8, backlog=32) == 24 and m.capacity(9, backlog=100) == 0 and m.to_take(8, 0, 100) == 32


def test_admission_auto_caps_images_in_flight_at_the_measured_knee_on_a_cpu_only():
    """ALIT_ADMISSION=auto (the default) measures the step-cost curve at warm-up on a CPU and caps images in
    flight (below saturation) at its knee; elsewhere it takes the whole batch. A named mode is taken as given."""
    assert Settings().admission == "auto" == EngineSettings().admission
    assert admission_mode("auto", "cpu") == "measured" and admission_mode("auto", "cuda:0") == "max_batch"
    assert admission_mode("max_batch", "cpu") == "max_batch" and admission_mode("measured", "cuda:1") == "measured"
    with pytest.raises(ValueError, match="admission: 'fifo'"):
        admission_mode("fifo", "cpu")
    with pytest.raises(ValidationError, match="admission"):
        Settings(admission="fifo")
    loaded = resolve("preset:test_tiny")
    curves = []
    for policy, mode, capped in (("continuous", "auto", True), ("continuous", "auto", True),
                                 ("continuous", "max_batch", False), ("lockstep", "auto", False)):
        eng = Engine(loaded, EngineSettings(devices="cpu", max_batch=8, policy=policy, admission=mode)).start()
        try:
            w = eng.workers[0]
            limit = getattr(w.scheduler.policy, "limit", None)
            if capped:
                assert w.cost_curve is not None and set(w.cost_curve.step_seconds) == {1, 2, 4, 8}
                assert limit == min(8, w.cost_curve.knee())
                curves.append(w.cost_curve)
            else:  # nothing measured: the whole batch (lock-step has no use for a curve)
                assert w.cost_curve is None and limit in (8, None)
        finally:
            eng.shutdown()
    assert curves[0] is curves[1]  # measured once per process for the same model, device and settings


def test_select_is_the_engine_rule_for_a_target():
    from service.engine.records import IterationRecord

    limits = ALITLimits(32, 8)
    recs = {n: IterationRecord(n, torch.zeros(32 * n).numpy(), l1, 20.0) for n, l1 in
            zip(range(1, 9), [0.3, 0.2, 0.25, 0.1, 0.09, 0.2, 0.2, 0.2])}
    assert Target(max_l1=0.15).select(recs, limits).iterations == 4
    s = Target(max_l1=0.01, max_tokens=96).select(recs, limits)
    assert (s.iterations, s.record.iteration, s.target_met) == (3, 2, False)
    assert Target(tokens=64).select(recs, limits).record.iteration == 2
    assert Target(max_l1=0.15).select({1: recs[1], 2: recs[2]}, limits) is None  # undecided yet


def test_bench_command_writes_the_report(tmp_path):
    out = tmp_path / "bench.json"
    r = run_cli("bench", "--model", "preset:test_tiny", "--saturation-requests", "12", "--reference-requests", "3",
                "--poisson-requests", "8", "--load-fractions", "0.7", "--crops", "2", "--max-batch", "8",
                "--sim-saturation", "8", "--threads", "1", "--repeats", "2", "--json", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "saturation (round 2 of 2): continuous" in r.stdout and "SIMULATED" in r.stdout
    rep = json.loads(out.read_text())
    for name in ("reference", "lockstep", "continuous"):
        s = rep["strategies"][name]
        assert s["saturation_throughput"] > 0 and s["efficiency"] > 0
        assert s["p99_at_70pct_lockstep_load"] >= s["p50_at_70pct_lockstep_load"] > 0
        # two rounds, strategies interleaved; the report keeps both runs and their median
        assert len(s["saturation_runs"]) == 2 and s["saturation_throughput"] == statistics.median(s["saturation_runs"])
        at70 = s["poisson"][0]
        assert len(at70["runs"]) == 2 and at70["p99_s"] == statistics.median(r["p99_s"] for r in at70["runs"])
    assert rep["simulated"]["note"].startswith("SIMULATED")
    # the profile is taken again at the end, and the change of the machine's speed reported
    assert len(rep["profile_after"]["iteration_ms_per_image"]) == len(rep["profile"]["iteration_ms_per_image"])
    assert rep["machine"]["speed_drift"] > -1 and "profile again after the runs" in r.stdout


def test_bench_names_a_folder_or_model_it_cannot_use(tmp_path):
    empty, junk = tmp_path / "empty", tmp_path / "junk"
    empty.mkdir()
    junk.mkdir()
    (junk / "a.png").write_bytes(b"not a png")
    for folder, says in ((tmp_path / "missing", "no such folder"), (empty, "no images"),
                         (junk, "a.png is not an image")):
        r = run_cli("bench", "--model", "preset:test_tiny", "--quick", "--images", str(folder))
        assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    r = run_cli("bench", "--model", str(tmp_path / "no-model"), "--quick")
    assert r.returncode == 2 and "checkpoint not found" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


# ----- any family: KARL through the same benchmark, and families at the same targets ------------------


def test_workload_walks_the_ladders_a_family_gives():
    """KARL's targets are what it accepts (max_l1, max_tokens caps), each walks one probe without
    retries, and every probe of their ladders is measured; the simulated device declines it."""
    loaded = resolve("preset:karl_test_tiny")
    limits = loaded.limits
    pixels = workload.tensors(workload.corpus(workload.load_folder(DEFAULT_IMAGES), 0)[:4], limits.img_size)
    m = workload.measure(loaded.model, pixels, [workload.default_walk(limits)], halting=True)
    targets = workload.calibrate(m, limits)
    assert targets and all(t.tokens is None and t.min_psnr is None and t.max_l1 is not None for t in targets)
    assert sorted({t.max_tokens for t in targets if t.max_tokens}) == [128, 256, 512]
    walks = workload.walks_of(targets, limits)
    assert all(len(w) == 1 for w in walks)
    m = m.merged(workload.measure(loaded.model, pixels, m.missing(walks), halting=True, skip=m.keys))
    assert not m.missing(walks) and m.l1.shape == (len(m.keys), 4)
    reqs = workload.plan_requests(20, 4, targets, m, limits, seed=0)
    assert {r.halts_at for r in reqs} == {1}
    assert simulate.unusable(limits) is not None
    assert simulate.unusable(resolve("preset:test_tiny").limits) is None


def test_bench_runs_a_karl_model(tmp_path):
    out = tmp_path / "karl.json"
    r = run_cli("bench", "--model", "preset:karl_test_tiny", "--saturation-requests", "12", "--reference-requests",
                "3", "--poisson-requests", "8", "--load-fractions", "0.7", "--crops", "2", "--max-batch", "8",
                "--threads", "1", "--repeats", "1", "--json", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(out.read_text())
    for name in ("reference", "lockstep", "continuous"):
        s = rep["strategies"][name]
        assert s["saturation_throughput"] > 0 and s["efficiency"] > 0
        assert s["saturation"]["mean_iterations"] == 1  # one single pass per image without retries
    prof = rep["profile"]
    assert prof["probe_ms_per_image"] and prof["decode_ms_per_image"] > 0 and "iteration_ms_per_image" not in prof
    assert set(prof["probes"]) == set(prof["probe_ms_per_image"])
    assert all("max_l1" in t and "tokens" not in t for t in rep["workload"]["targets"])  # what KARL takes
    # the simulated device models ALIT's iterations: skipped, and said so
    assert "not successive iterations" in rep["simulated"]["skipped"] and "SIMULATED device skipped" in r.stdout


def _bench_args(*argv: str):
    import argparse

    from service.bench import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


def test_families_at_the_same_targets(tmp_path):
    from service.bench import families

    photos = tmp_path / "photos"
    photos.mkdir()
    for p in sorted(DEFAULT_IMAGES.rglob("*.png"))[:2]:
        (photos / p.name).write_bytes(p.read_bytes())
    args = _bench_args("--families", "alit=preset:test_tiny,karl=preset:karl_test_tiny", "--targets", "0.1,0.3",
                       "--images", str(photos), "--crops", "0", "--max-batch", "8")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rep = families.run(args)
    finally:
        torch.set_num_threads(threads)
    assert [(r["model"], r["max_l1"]) for r in rep["rows"]] == [
        ("alit", 0.1), ("karl", 0.1), ("alit", 0.3), ("karl", 0.3)]
    for r in rep["rows"]:
        m = rep["models"][r["model"]]
        assert r["images"] == 7 and r["img_size"] == m["img_size"] == 64  # 2 photos, 3 flat, 2 noise
        assert r["wall_ms_per_image"] > 0 and r["compute_ms_mean"] > 0 and r["throughput"] > 0
        assert 1 <= r["probes_per_image"] <= m["max_probes"] and r["pixel_decodes_per_image"] >= 1
        assert r["tokens_mean"] > 0 and 0 <= r["target_met_fraction"] <= 1 and r["l1_mean"] > 0
    karl = [r for r in rep["rows"] if rep["models"][r["model"]]["max_probes"] == 1]
    assert len(karl) == 2 and all(r["probes_per_image"] == 1 for r in karl)  # one single pass, no retries
    assert rep["random_weights"] == ["alit", "karl"] and "NOT meaningful tokens" in rep["note"]
    assert "wall ms/img" in families.table(rep["rows"])


def test_families_options_and_cuda_device():
    from service.bench import engine_settings, families

    args = _bench_args("--families", "a=preset:test_tiny", "--device", "cuda", "--dtype", "bfloat16")
    s = engine_settings(args)
    assert (s.devices, s.dtype, s.policy) == ("cuda", "bfloat16", "continuous")  # what the engines get
    assert families.parse_families("a=preset:x, b=/w") == [("a", "preset:x"), ("b", "/w")]
    for bad, says in (("karl", "NAME=SPEC"), ("a=x,a=y", "twice"), ("", "no models")):
        with pytest.raises(families.FamiliesError, match=says):
            families.parse_families(bad)
    with pytest.raises(families.FamiliesError, match="max_l1 levels"):
        families.parse_targets("0.1,2")
    if not torch.cuda.is_available():  # accepted, then refused cleanly where there is no GPU
        r = run_cli("bench", "--families", "a=preset:test_tiny", "--device", "cuda")
        assert r.returncode == 2 and "no CUDA device" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_bench_refuses_what_would_stop_an_engine_before_measuring_anything():
    """A batch mode or speed setting the device cannot run is one line before any work, not a traceback
    after the profile."""
    from service.cli import main

    with pytest.raises(SystemExit, match="^error: batch mode 'varlen' runs flash attention"):
        main(["bench", "--batch-mode", "varlen", "--quick", "--no-simulate"])
    with pytest.raises(SystemExit, match="^error: ALIT_CUDA_GRAPHS needs a CUDA device"):
        main(["bench", "--cuda-graphs", "--quick", "--no-simulate"])
