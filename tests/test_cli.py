"""The `alit-serve` command line, run as a user runs it (a subprocess)."""

from __future__ import annotations

import shutil

import torch

from conftest import FIXTURE, free_port, run_cli


def test_verify_exits_zero_on_the_fixture(fixture_dir):
    r = run_cli("verify", str(fixture_dir))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "RESULT: PASS" in r.stdout
    assert "encode_stop_iter" in r.stdout and "recon_iter7" in r.stdout


def test_verify_exits_nonzero_on_a_corrupted_copy(tmp_path, fixture_dir):
    bad = tmp_path / "fixture"
    shutil.copytree(fixture_dir, bad)
    ck = torch.load(bad / "checkpoint.pth", map_location="cpu", weights_only=True)
    sd = {k: v.clone() for k, v in ck["ema"].items()}
    sd["base_tokenizer.vqgan.decoder.conv_out.bias"][0] += 1e-3  # one weight, slightly changed
    torch.save({"ema": sd, "model": sd, "epoch": 0}, bad / "checkpoint.pth")
    r = run_cli("verify", str(bad))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "RESULT: FAIL" in r.stdout
    failing = [l.split()[0] for l in r.stdout.splitlines() if l.endswith("FAIL")]
    assert "recon_iter0" in failing


def test_verify_reports_a_missing_fixture_cleanly(tmp_path):
    r = run_cli("verify", str(tmp_path / "nothing"))
    assert r.returncode == 2
    assert "error:" in r.stderr and "Traceback" not in r.stderr


def test_convert_then_load(tmp_path, fixture_dir, images):
    r = run_cli("convert", str(fixture_dir / "checkpoint.pth"), str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()
    import torch

    from service.model.registry import resolve

    original = resolve(str(fixture_dir / "checkpoint.pth"))
    converted = resolve(str(tmp_path / "out"))  # the path ALIT_MODEL=OUT_DIR takes
    assert converted.source == str(tmp_path / "out" / "model.safetensors")
    assert converted.fingerprint == original.fingerprint
    assert f"fingerprint {converted.fingerprint}" in r.stdout
    with torch.inference_mode():  # the same weights compute the same tokens
        a = original.model.advance(original.model.prepare(images[:2]))
        b = converted.model.advance(converted.model.prepare(images[:2]))
    for x, y in zip(a, b):
        assert torch.equal(x.token_ids, y.token_ids)


def test_client_commands_fail_in_one_line_without_a_traceback(tmp_path):
    """An unreachable server, a missing image or malformed token ids: one line on stderr, exit 1 or 2."""
    photo = FIXTURE / "images" / "birds" / "000000.png"
    nowhere = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for args, code, says in (
        (["tokenize", str(photo), "--url", nowhere], 1, f"cannot reach {nowhere}"),
        (["tokenize", str(tmp_path / "missing.png"), "--url", nowhere], 2, "no such image file"),
        (["reconstruct", "[1, 2]", "--url", nowhere, "-o", str(tmp_path / "r.png")], 1, f"cannot reach {nowhere}"),
        (["reconstruct", "1, two, 3", "--url", nowhere], 2, "token ids must be"),
        (["reconstruct", '{"ids": [1]}', "--url", nowhere], 2, "token ids must be"),
    ):
        r = run_cli(*args)
        assert r.returncode == code and says in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
