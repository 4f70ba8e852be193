"""The speed settings of the convolution stacks (`service/model/speed.py`): ALIT_CHANNELS_LAST,
ALIT_COMPILE=vqgan, ALIT_CUDA_GRAPHS — what can be checked on a CPU: the same outputs as the default,
the bucketing and padding of the CUDA-graph path (graphs off: the padded batch run eagerly), the
settings' parsing, and the refusal of CUDA graphs without CUDA. The graphs themselves, and the speed,
need a GPU: `python -m service.model.speed` in loadtest/gpu_checks.sh."""

from __future__ import annotations

import asyncio
import copy
import json

import pytest
import torch
from pydantic import ValidationError

from service.engine import Engine, EngineSettings, Target
from service.model.compile import compile_scope
from service.model.registry import resolve
from service.model.speed import (
    OneDNNConv,
    Speedups,
    StackForward,
    bucket_for,
    bucket_sizes,
    capture_order,
    conv_stacks,
    main,
    onednn_convolutions,
    pad_batch,
    prepare_for_device,
    speed_up_conv_stacks,
)
from service.settings import Settings, engine_settings

F32 = {"rtol": 1e-5, "atol": 5e-5}  # channels-last / compiled convolutions sum in another order: rounding only


@pytest.fixture(scope="module")
def tiny():
    return resolve("preset:test_tiny").model.eval()


def _inputs(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 64, 64, generator=g), 3 * torch.randn(n, 256, 128, generator=g)  # pixels; logits


def _outputs(model, images: torch.Tensor, logits: torch.Tensor, dtype: str = "float32"):
    """VQGAN z and code ids, the ALIT states' ids, and the pixels of a reconstruction."""
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bfloat16" else torch.autocast("cpu", enabled=False)
    with torch.inference_mode(), ctx:
        z, ids = model.vqgan.encode(images)
        states = model.prepare(images)
        pixels = model.reconstruct(logits)
    return z.float(), ids, torch.stack([s.gt_indices for s in states]), pixels


# ----- settings ---------------------------------------------------------------------------------------
def test_compile_scope_keeps_the_boolean_and_adds_vqgan(clean_env):
    assert [compile_scope(v) for v in (False, True, None, "false", "TRUE", "1", "0", "on", "vqgan", "all", "off")] \
        == ["off", "all", "off", "off", "all", "all", "off", "all", "vqgan", "all", "off"]
    with pytest.raises(ValueError, match="none of off, vqgan, all"):
        compile_scope("blocks")
    s = Settings()
    assert (s.compile, s.channels_last, s.cuda_graphs) == ("off", False, False)  # all off by default
    for env, scope in (("true", "all"), ("false", "off"), ("vqgan", "vqgan"), ("all", "all")):
        clean_env.setenv("ALIT_COMPILE", env)
        assert Settings().compile == scope
    clean_env.setenv("ALIT_COMPILE", "sometimes")
    with pytest.raises(ValidationError, match="compile"):
        Settings()
    clean_env.setenv("ALIT_COMPILE", "vqgan")
    clean_env.setenv("ALIT_CHANNELS_LAST", "true")
    clean_env.setenv("ALIT_CUDA_GRAPHS", "1")
    e = engine_settings(Settings())
    assert (e.compile, e.channels_last, e.cuda_graphs) == ("vqgan", True, True)
    assert e.speedups() == Speedups(channels_last=True, compile="vqgan", cuda_graphs=True)
    # the engine's own settings still take a boolean (the benchmark and tests pass one)
    assert EngineSettings(compile=True).speedups().compile == "all"
    assert not EngineSettings().speedups().changes_model and EngineSettings(compile="vqgan").speedups().changes_model


# ----- CUDA graphs: buckets and padding ----------------------------------------------------------------
def test_buckets_are_powers_of_two_up_to_the_max_batch():
    assert bucket_sizes(32) == (1, 2, 4, 8, 16, 32)
    assert bucket_sizes(24) == (1, 2, 4, 8, 16, 24)
    assert bucket_sizes(1) == (1,)
    assert [bucket_for(n, bucket_sizes(24)) for n in (1, 2, 3, 5, 16, 17, 24)] == [1, 2, 4, 8, 16, 24, 24]
    with pytest.raises(ValueError):
        bucket_for(25, bucket_sizes(24))
    assert capture_order(bucket_sizes(32)) == (1, 2, 32, 16, 8, 4)  # compile's warm order, then large to small
    x = torch.arange(6.0).view(3, 2)
    padded = pad_batch(x, 4)
    assert padded.shape == (4, 2) and torch.equal(padded[:3], x) and not padded[3].any()
    assert pad_batch(x, 3) is x


def test_padding_up_to_a_bucket_changes_no_row(tiny):
    """Every batch size from 1 to the max batch, and two beyond it (chunks): the padded path (graphs off, so the
    padded batch runs eagerly) against the plain call, per stack and through the model's own calls. Every
    operation of a stack is per sample (GroupNorm included), so the rows are the same."""
    padded = speed_up_conv_stacks(copy.deepcopy(tiny), graph_batch=8, graphs=False)
    enc = padded.vqgan.encoder.forward
    assert isinstance(enc, StackForward) and enc.bucketed is not None and enc.bucketed.buckets == (1, 2, 4, 8)
    calls = []
    inner = enc.bucketed.fn
    enc.bucketed.fn = lambda x: calls.append(x.shape[0]) or inner(x)  # the batch sizes really run
    with torch.inference_mode():
        for n in [*range(1, 9), 11, 17]:
            images, logits = _inputs(n, seed=n)
            calls.clear()
            torch.testing.assert_close(padded.vqgan.encoder(images), tiny.vqgan.encoder(images), **F32)
            chunks = [8] * (n // 8) + ([n % 8] if n % 8 else [])
            assert calls == [bucket_for(c, (1, 2, 4, 8)) for c in chunks]
            torch.testing.assert_close(padded.reconstruct(logits), tiny.reconstruct(logits), **F32)  # the decoder


# ----- a CPU: every convolution on oneDNN ------------------------------------------------------------------
def test_on_a_cpu_an_image_encoded_alone_is_bit_for_bit_its_row_of_a_batch(tiny):
    """Continuous batching under light load encodes arrivals one by one: the served model must give a
    lone image the same VQGAN output as a batch does (PyTorch's own heuristic sends a lone image's small
    convolutions to another kernel), and the default's outputs otherwise."""
    images, logits = _inputs(5)
    with torch.inference_mode():
        default_alone = torch.cat([tiny.vqgan.encode(images[i:i + 1])[0] for i in range(5)])
    served = prepare_for_device(copy.deepcopy(tiny), "cpu", "float32")
    assert isinstance(served.vqgan.encoder.conv_in.forward, OneDNNConv)
    assert isinstance(served.vqgan.decoder.conv_out.forward, OneDNNConv)
    z0, ids0, gt0, px0 = _outputs(tiny, images, logits)
    z1, ids1, gt1, px1 = _outputs(served, images, logits)
    torch.testing.assert_close(z1, z0, **F32)
    torch.testing.assert_close(px1, px0, **F32)
    assert torch.equal(ids1, ids0) and torch.equal(gt1, gt0)
    with torch.inference_mode():
        alone = torch.cat([served.vqgan.encode(images[i:i + 1])[0] for i in range(5)])
        torch.testing.assert_close(default_alone, z1, **F32)  # the default alone: equal to rounding only
        assert torch.equal(alone, z1)  # served: bit for bit
    copied = copy.deepcopy(served)  # a worker's copy runs its own weights
    assert copied.vqgan.encoder.conv_in.forward.conv is copied.vqgan.encoder.conv_in
    onednn_convolutions(copied, on=False)  # not a CPU (or compiled): the class's forward again
    assert "forward" not in copied.vqgan.encoder.conv_in.__dict__
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: the class's forward
        assert torch.equal(served.vqgan.encode(images)[0], tiny.vqgan.encode(images)[0])


# ----- channels-last ---------------------------------------------------------------------------------------
def test_channels_last_gives_the_default_outputs(tiny):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    fast = prepare_for_device(copy.deepcopy(tiny), "cpu", "float32", Speedups(channels_last=True))
    conv = fast.vqgan.encoder.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert fast.vqgan.decoder.conv_out.weight.is_contiguous(memory_format=torch.channels_last)
    assert fast.encoder.transformer[0].token_fns == tiny.encoder.transformer[0].token_fns  # blocks untouched
    images, logits = _inputs(6)
    z0, ids0, gt0, px0 = _outputs(tiny, images, logits)
    z1, ids1, gt1, px1 = _outputs(fast, images, logits)
    assert z1.is_contiguous() and px1.is_contiguous()  # the rest of the model sees the usual layout
    torch.testing.assert_close(z1, z0, **F32)
    torch.testing.assert_close(px1, px0, **F32)
    assert torch.equal(ids1, ids0) and torch.equal(gt1, gt0)
    # the weights keep their names and values (fingerprints, exports), and the source model is untouched
    assert fast.state_dict().keys() == before.keys()
    assert all(torch.equal(fast.state_dict()[k].cpu(), v) for k, v in before.items())
    assert "forward" not in tiny.vqgan.encoder.__dict__ and tiny.vqgan.encoder.conv_in.weight.is_contiguous()
    # in bfloat16 (autocast, as ALIT_DTYPE=bfloat16 runs): the default's bfloat16 outputs, to bfloat16 rounding
    zb0, _, _, pxb0 = _outputs(tiny, images, logits, "bfloat16")
    zb1, _, _, pxb1 = _outputs(fast, images, logits, "bfloat16")
    for a, b in ((zb1, zb0), (pxb1, pxb0)):
        assert float((a - b).abs().max() / b.abs().max()) < 5e-2


def test_a_prepared_model_copies_and_prepares_again_from_scratch(tiny):
    fast = prepare_for_device(copy.deepcopy(tiny), "cpu", "float32", Speedups(channels_last=True))
    twin = copy.deepcopy(fast)
    fwd = twin.vqgan.decoder.forward
    assert isinstance(fwd, StackForward) and fwd.module is twin.vqgan.decoder  # bound to the copy, not the source
    logits = _inputs(2)[1]
    torch.testing.assert_close(twin.reconstruct(logits), fast.reconstruct(logits), rtol=0, atol=0)
    speed_up_conv_stacks(twin)  # nothing on: the class's forward again
    assert "forward" not in twin.vqgan.decoder.__dict__
    torch.testing.assert_close(twin.reconstruct(logits), tiny.reconstruct(logits), **F32)


def test_every_family_with_convolution_stacks_has_them_found():
    for spec, names in (("preset:test_tiny", ["vqgan.encoder", "vqgan.decoder"]),
                        ("preset:karl_test_tiny", ["vqgan.encoder", "vqgan.decoder"]),
                        ("preset:titok_test_tiny", ["pixel_decoder"])):
        model = resolve(spec).model.eval()
        stacks = conv_stacks(model)
        assert [s.name for s in stacks] == names, spec
        assert all(s.sample_shape is not None for s in stacks), spec
        fast = prepare_for_device(copy.deepcopy(model), "cpu", "float32", Speedups(channels_last=True))
        for s in stacks:  # each stack on an input of its shape, against the model's own
            x = (torch.rand if s.name.endswith("encoder") else torch.randn)(3, *s.sample_shape)
            mine = {t.name: t.module for t in conv_stacks(fast)}[s.name]
            with torch.inference_mode():
                torch.testing.assert_close(mine(x), s.module(x), **F32)


# ----- torch.compile of the stacks only --------------------------------------------------------------------
def test_compile_vqgan_compiles_the_stacks_only_and_gives_eager_outputs(tiny):
    fast = prepare_for_device(copy.deepcopy(tiny), "cpu", "float32", Speedups(compile="vqgan"))
    assert fast.encoder.transformer[0].token_fns == tiny.encoder.transformer[0].token_fns  # blocks stay eager
    assert isinstance(fast.vqgan.encoder.forward, StackForward) and fast.vqgan.encoder.forward.compiled
    images, logits = _inputs(3)  # one batch size: one graph per stack (each compiles in tens of seconds)
    z0, ids0, gt0, px0 = _outputs(tiny, images, logits)
    z1, ids1, gt1, px1 = _outputs(fast, images, logits)
    torch.testing.assert_close(z1, z0, **F32)
    torch.testing.assert_close(px1, px0, **F32)
    assert torch.equal(ids1, ids0) and torch.equal(gt1, gt0)


# ----- the engine ----------------------------------------------------------------------------------------
def test_cuda_graphs_are_refused_without_a_cuda_device(tiny):
    with pytest.raises(ValueError, match="ALIT_CUDA_GRAPHS needs a CUDA device.*'cpu'"):
        prepare_for_device(copy.deepcopy(tiny), "cpu", "float32", Speedups(cuda_graphs=True))
    loaded = resolve("preset:test_tiny")
    with pytest.raises(ValueError, match="ALIT_CUDA_GRAPHS"):
        Engine(loaded, EngineSettings(devices="cpu", cuda_graphs=True, warmup=False)).start()


@pytest.mark.parametrize("batch_mode", ["packed", "cohort", "padded"])
def test_the_engine_with_channels_last_answers_as_without(batch_mode):
    """The engine prepares a copy of the model (channels-last changes it) and answers every image as the
    default engine does, in every batch mode."""
    loaded = resolve("preset:test_tiny")
    images = _inputs(6, seed=3)[0]
    targets = [Target(max_l1=0.2), Target(tokens=96), Target(max_l1=1e-9)]

    async def go(**kw):
        eng = Engine(loaded, EngineSettings(devices="cpu", max_batch=4, batch_mode=batch_mode, warmup=False,
                                            **kw)).start()
        try:
            if kw:
                assert eng.workers[0].runner.model is not loaded.model
            return await asyncio.gather(*[eng.tokenize(im, targets[i % 3]) for i, im in enumerate(images)])
        finally:
            eng.shutdown()

    plain, fast = asyncio.run(go()), asyncio.run(go(channels_last=True))
    assert "forward" not in loaded.model.vqgan.encoder.__dict__  # the shared model was not prepared in place
    for a, b in zip(plain, fast):
        assert a.selected_iteration == b.selected_iteration
        assert list(a.token_ids) == list(b.token_ids)
        if a.l1 is not None:
            assert b.l1 is not None and abs(a.l1 - b.l1) <= 1e-5


# ----- python -m service.model.speed --------------------------------------------------------------------------
def test_the_comparison_command_runs_on_a_cpu(tmp_path, capsys):
    out = tmp_path / "speed.json"
    rc = main(["--model", "preset:test_tiny", "--device", "cpu", "--dtype", "float32", "--sizes", "3,1",
               "--repeats", "1", "--variants", "default,channels_last,cuda_graphs", "--json", str(out)])
    assert rc == 0, capsys.readouterr().out
    rows = json.loads(out.read_text())["results"]
    assert [r["variant"] for r in rows] == ["default", "channels_last"]  # CUDA graphs: skipped off CUDA
    cl = rows[1]["stacks"]["vqgan.encoder"]["3"]
    assert cl["ok"] and cl["max_rel_diff"] <= 1e-4 and cl["code_ids_differing"] == 0
    assert "channels_last" in capsys.readouterr().out
