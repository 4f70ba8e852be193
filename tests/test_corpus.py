"""The Debian-package training corpus (service/training/corpus.py) and its use in the crop pool.

Built for real from mypaint-data-extras (2.9 MB of CC0 paper textures, installed by `make
system-deps`), with a few extra files slipped into its dpkg listing: a rescaled copy of one of its
textures (a duplicate), a corrupt and a truncated file, a tiny image and a flat magenta picture
whose crops are recognisable in the pool."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.training import corpus as C
from service.training import main as training_main
from service.training.data import load_sources, make_pool

PKG = "mypaint-data-extras"
SIDE = 256  # max_side of the test corpus (small: fast)
MAGENTA = (255, 0, 255)
# sha256 of make_pool(64, 64, 0) before the corpus existed: the shipped model's pool must not change.
POOL_64_64_0 = "5a4acbdf08b6c1213622115284133cd2a08d4d294d4c40b7d2447399d245d5b7"
REAL_FILES = C.package_files  # the `built` fixture patches C.package_files while its corpus is in use


def _installed() -> list[Path]:
    if C.installed_version(PKG) is None:
        pytest.fail(f"Debian package {PKG} is not installed: `make system-deps` installs it (apt-get install {PKG})")
    return REAL_FILES(PKG)


@pytest.fixture(scope="module")
def extras(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("extras")
    real = _installed()
    biggest = max(real, key=lambda p: (Image.open(p).size[0] * Image.open(p).size[1], str(p)))
    im = Image.open(biggest).convert("RGB")
    out = {"original": biggest}
    out["dup"] = d / "rescaled_copy.png"
    im.resize((im.width * 3 // 4, im.height * 3 // 4), Image.Resampling.BICUBIC).save(out["dup"])
    out["broken"] = d / "broken.png"
    out["broken"].write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)
    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (600, 800, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, format="JPEG", quality=90)
    out["truncated"] = d / "truncated.jpg"
    out["truncated"].write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    out["tiny"] = d / "tiny.png"
    Image.new("RGB", (100, 80), (10, 200, 30)).save(out["tiny"])
    out["magenta"] = d / "magenta.png"
    Image.new("RGB", (900, 600), MAGENTA).save(out["magenta"])
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory, extras):
    """(corpus dir, manifest) of mypaint-data-extras plus the extra files, max_side 256."""
    real = REAL_FILES
    added = [extras[k] for k in ("dup", "broken", "truncated", "tiny", "magenta")]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(C, "package_files", lambda pkg: real(pkg) + added if pkg == PKG else real(pkg))
        out = tmp_path_factory.mktemp("corpus")
        man = C.build_corpus(out, [PKG], max_side=SIDE)
        yield out, man


def test_package_files_come_from_dpkg():
    files = _installed()
    listed = subprocess.run(["dpkg", "-L", PKG], capture_output=True, text=True, check=True).stdout.split("\n")
    expect = sorted(Path(p) for p in listed if re.search(r"/mypaint/backgrounds/.*\.(png|jpe?g)$", p, re.I))
    assert files == expect and len(files) >= 10
    assert all(p.is_file() for p in files)


def test_manifest_dedupe_and_skips(built, extras):
    out, man = built
    assert man["cached"] is False
    real = REAL_FILES(PKG)
    p = man["packages"][PKG]
    assert p["installed"] and p["version"] == C.installed_version(PKG)
    assert p["found"] == len(real) + 5
    # unreadable: the corrupt and the truncated file, named with their error
    assert sorted(s.split(":")[0] for s in p["unreadable"]) == sorted([str(extras["broken"]), str(extras["truncated"])])
    # too small: the tiny image and every real file with a shorter side under MIN_SIDE
    small = {str(f) for f in real if min(Image.open(f).size) < C.MIN_SIDE} | {str(extras["tiny"])}
    assert {s.split(":")[0] for s in p["too_small"]} == small
    # the rescaled copy is the same picture as the original: the larger (original) one is kept
    assert p["duplicates"] == [f"{extras['dup']} (same picture as {extras['original']})"]
    paths = [f["path"] for f in man["files"]]
    assert str(extras["original"]) in paths and str(extras["dup"]) not in paths
    assert str(extras["magenta"]) in paths
    assert p["kept"] == len(man["files"]) == p["found"] - 2 - len(small) - 1
    assert man["totals"]["files"] == len(man["files"])
    assert man["totals"]["bytes"] == sum(f["bytes"] for f in man["files"]) == p["bytes"]
    for f in man["files"]:
        cached = out / f["file"]
        data = cached.read_bytes()
        assert hashlib.sha256(data).hexdigest() == f["sha256"] and len(data) == f["bytes"]
        im = Image.open(cached)
        assert im.format == "PNG"  # a texture package: lossless
        assert list(im.size) == f["cached_size"]
        assert min(im.size) == min(SIDE, min(f["size"]))  # downsized to max_side, never upscaled
        assert abs(im.size[0] / im.size[1] - f["size"][0] / f["size"][1]) < 0.02  # aspect kept
        assert f["package"] == PKG and f["version"] == p["version"]
        assert Path(f["path"]).is_file()
        if f["path"].startswith("/usr/share/"):
            assert f["licence"] == "CC0-1.0" and f["copyright"]  # from the package's debian/copyright, per file
    assert json.loads((out / C.MANIFEST).read_text())["files"] == man["files"]
    assert not [q for q in out.rglob("*") if ".tmp" in q.name]


def test_rerun_is_cached_and_changes_rebuild(built, tmp_path):
    out, man = built
    before = {q: q.stat().st_mtime_ns for q in out.rglob("*") if q.is_file()}
    again = C.build_corpus(out, [PKG], max_side=SIDE)
    assert again["cached"] is True and again["files"] == man["files"]
    assert {q: q.stat().st_mtime_ns for q in out.rglob("*") if q.is_file()} == before
    # a changed setting rebuilds (in a copy); a damaged cache rebuilds too
    copy = tmp_path / "c"
    shutil.copytree(out, copy)
    small = C.build_corpus(copy, [PKG], max_side=128)
    assert small["cached"] is False
    assert all(min(f["cached_size"]) <= 128 for f in small["files"])
    assert sorted(q.relative_to(copy).as_posix() for q in (copy / "images").rglob("*") if q.is_file()) == \
        sorted(f["file"] for f in small["files"])
    (copy / small["files"][0]["file"]).unlink()
    assert C.build_corpus(copy, [PKG], max_side=128)["cached"] is False


def test_missing_package_is_an_error_or_skipped(tmp_path):
    with pytest.raises(C.MissingPackages, match=r"apt-get install no-such-package-alit"):
        C.build_corpus(tmp_path, ["no-such-package-alit"])
    with pytest.warns(UserWarning, match="no-such-package-alit is not installed"):
        man = C.build_corpus(tmp_path, ["no-such-package-alit"], skip_missing=True)
    assert man["files"] == [] and man["totals"]["missing"] == ["no-such-package-alit"]
    assert not man["packages"]["no-such-package-alit"]["installed"]


def test_name_key_and_same_picture():
    a = C.name_key(Path("/usr/share/wallpapers/Path/contents/images/2560x1600.jpg"))
    assert a == C.name_key(Path("/usr/share/wallpapers/Path/contents/images/1280x1024.jpg"))
    assert a != C.name_key(Path("/usr/share/wallpapers/Grey/contents/images/2560x1600.jpg"))
    assert C.name_key(Path("/x/Elephants_3840x2160.jpg")) == C.name_key(Path("/x/Elephants.jpg"))
    rng = np.random.default_rng(1)
    photo = Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).resize((800, 600))
    other = Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).resize((800, 600))
    t = C._thumb(photo)
    assert C.same_picture(t, C._thumb(photo.resize((400, 300), Image.Resampling.LANCZOS)))
    assert not C.same_picture(t, C._thumb(other))


def test_pool_without_corpus_is_unchanged():
    a = make_pool(64, 64, 0)
    assert hashlib.sha256(a.tobytes()).hexdigest() == POOL_64_64_0
    assert np.array_equal(a, make_pool(64, 64, 0, corpus=None))


def _magenta(pool: np.ndarray) -> int:
    p = pool.astype(int)
    return int(np.sum((p[..., 1] == 0).all(axis=(1, 2)) & (p[..., 0] >= 200).all(axis=(1, 2))
                      & (p[..., 2] >= 200).all(axis=(1, 2))))


def test_pool_with_corpus_crops_corpus_images(built):
    out, man = built
    base = load_sources()
    src = load_sources(out)
    assert [s[0] for s in src[: len(base)]] == [s[0] for s in base]
    assert [s[0] for s in src[len(base):]] == ["corpus:" + f["file"].removeprefix("images/") for f in man["files"]]
    assert all(s[1].ndim == 3 and s[1].shape[2] == 3 for s in src)
    with_corpus = make_pool(400, 32, 1, corpus=out)
    assert _magenta(with_corpus) > 0  # crops of the corpus's magenta picture
    assert _magenta(make_pool(400, 32, 1)) == 0


def test_licence_lines_and_command(built, capsys):
    out, man = built
    lines = C.licence_lines(out)
    assert any(PKG in line and "CC0-1.0" in line and man["packages"][PKG]["version"] in line for line in lines)
    # the same packages and settings as the fixture's build: the command finds it cached
    assert training_main(["corpus", "--out", str(out), "--packages", PKG, "--max-side", str(SIDE)]) == 0
    text = capsys.readouterr().out
    p = man["packages"][PKG]
    assert re.search(rf"^{re.escape(PKG)}\s+\S+\s+{p['found']}\s+{p['kept']}\s", text, re.M)
    assert "cached (nothing rebuilt)" in text


def test_a_carried_corpus_supplies_sample_images_the_installed_packages_lack(tmp_path, monkeypatch):
    """On a machine whose scikit-image lacks a sample file (a GPU image), training reads the copy
    the corpus command put beside the corpus: the same sources, byte for byte."""
    from service.training import data

    assert data.bundle_samples(tmp_path) == len(data.SOURCES)
    assert data.bundle_samples(tmp_path) == 0  # equal copies are kept
    here = [(n, a.copy()) for n, a, _ in data.load_sources()]
    real = data.source_path
    monkeypatch.setattr(data, "source_path", lambda pkg, name: real(pkg, name).with_name("missing-" + name))
    with pytest.raises(FileNotFoundError):
        data.load_sources()  # no corpus: nothing to fall back on
    (tmp_path / "corpus.json").write_text('{"files": [], "packages": {}}')
    elsewhere = data.load_sources(tmp_path)
    assert [n for n, _, _ in elsewhere] == [n for n, _ in here]
    assert all(np.array_equal(a, b) for (_, a), (_, b, _) in zip(here, elsewhere))
