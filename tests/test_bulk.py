"""`alit-serve tokenize-dataset` (service/bulk): rows equal what the API's intake and the engine give
for every family; folders, path lists, WebDataset shards and Parquet give the same rows; bad input
becomes error rows (exit 1); usage errors are one line (exit 2); kill -9 then --resume gives every
image exactly once; --cache makes the API's cached path answer hits; and --ray on a two-node Ray
cluster on this machine writes the local run's rows. Real engine, real Parquet, real Ray, real Redis."""

from __future__ import annotations

import asyncio
import io
import json
import os
import random
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import CLI, FIXTURE, ROOT
from service.bulk import BulkError, tokenize_dataset
from service.cli import main as cli_main
from service.engine import Engine, EngineSettings, Target, parse_target
from service.imaging import ImageError, ImageLimits, open_image
from service.model.registry import resolve
from service.settings import Settings

ALIT = ROOT / "service" / "weights"
KARL = ROOT / "tests" / "fixtures" / "karl-reference"
ODP = ROOT / "tests" / "fixtures" / "one-d-piece-reference"
FAMILIES = [  # (model, a target its family takes): the shipped ALIT, the KARL and One-D-Piece fixtures
    pytest.param(ALIT, {"max_l1": 0.1}, id="alit"),
    pytest.param(KARL, {"max_l1": 0.5, "max_tokens": 128}, id="karl"),
    pytest.param(ODP, {"max_l1": 0.2}, id="titok"),
]


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def _encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """The ALIT fixture's 7 photos plus odd ones: flat, noise (WebP), a large JPEG (decoded at a DCT
    scale), a large RGBA PNG (box-reduced, alpha on white), a palette GIF, a tall thin PNG."""
    root = tmp_path_factory.mktemp("photos")
    shutil.copytree(FIXTURE / "images", root, dirs_exist_ok=True)
    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:560, 0:700]
    grad = np.stack([x * 255 // 700, y * 255 // 560, (x + y) * 255 // 1260], -1).astype(np.uint8)
    (root / "odd").mkdir()
    (root / "odd" / "flat.png").write_bytes(_png(np.full((30, 40, 3), 128, np.uint8)))
    (root / "odd" / "noise.webp").write_bytes(_encoded(Image.fromarray(
        rng.integers(0, 256, (70, 50, 3), dtype=np.uint8)), "WEBP", quality=90))
    (root / "odd" / "large.jpg").write_bytes(_encoded(Image.fromarray(grad), "JPEG", quality=90))
    big = np.concatenate([np.repeat(np.repeat(grad[:, :, :3], 2, 0), 2, 1)[:1100, :1050],
                          np.full((1100, 1050, 1), 200, np.uint8)], -1)
    (root / "odd" / "large_alpha.png").write_bytes(_png(big, "RGBA"))
    (root / "odd" / "palette.gif").write_bytes(_encoded(Image.fromarray(grad[:20, :33]).convert("P"), "GIF"))
    (root / "odd" / "thin.png").write_bytes(_png(grad[:30, :400]))
    return root


def read_rows(out: Path) -> dict[tuple[str | None, str], dict]:
    """Every row of OUT by (source, key), OUT read as one Parquet dataset (the manifest and the PNG
    are skipped by their leading `_`); a key written twice fails."""
    rows: dict[tuple[str | None, str], dict] = {}
    if not any(out.glob("part-*.parquet")):
        return rows
    for r in pq.read_table(out).to_pylist():
        assert (r["source"], r["key"]) not in rows, f"{r['key']} written twice"
        rows[(r["source"], r["key"])] = r
    return rows


def by_stem(rows: dict) -> dict[str, dict]:
    """Rows by the image's name without extension (how a folder's keys and a shard's keys meet)."""
    return {key.rsplit(".", 1)[0] if "." in key.rsplit("/", 1)[-1] else key: r for (_, key), r in rows.items()}


TOKENS = ("token_ids", "positions", "num_tokens", "iterations", "target_met", "error_code", "error")


def same_tokens(a: dict, b: dict) -> None:
    assert {k: a[k] for k in TOKENS} == {k: b[k] for k in TOKENS}
    for k in ("l1", "psnr"):
        assert (a[k] is None) == (b[k] is None) and (a[k] is None or abs(a[k] - b[k]) < 1e-5), k


def api_intake(limits):
    """The API's own intake (service/api/intake.py) with the service's settings."""
    from service.api.intake import DecodeBudget, Intake

    s = Settings()
    return Intake(ImageLimits(max_bytes=s.max_image_bytes, max_pixels=s.max_image_pixels), limits.img_size,
                  s.decode_scale, DecodeBudget(1 << 30), resample=limits.resample)


# ----- the rows are the API's --------------------------------------------------------------------------


@pytest.mark.parametrize("model,target", FAMILIES)
def test_rows_equal_the_api_intake_and_engine(dataset, tmp_path, model, target):
    summary = tokenize_dataset(dataset, tmp_path / "out", model=str(model), devices="cpu", quiet=True, **target)
    assert summary.exit_code == 0 and summary.counts["ok"] == 13
    rows = read_rows(tmp_path / "out")
    loaded = resolve(str(model))
    intake = api_intake(loaded.limits)
    want_target = parse_target(target, loaded.limits, Target(max_l1=Settings().default_max_l1))
    engine = Engine(loaded, EngineSettings(devices="cpu", warmup=False)).start()

    async def api(data: bytes):
        pixels, _ = await intake.image(data)
        return await engine.tokenize(pixels, want_target)

    try:
        for (source, key), row in rows.items():
            assert source is None and row["fingerprint"] == loaded.fingerprint
            assert json.loads(row["target"]) == want_target.to_dict()
            r = asyncio.run(api((dataset / key).read_bytes()))
            assert row["token_ids"] == r.token_ids.tolist(), key
            assert row["positions"] == (None if r.positions is None else r.positions.tolist()), key
            assert (row["num_tokens"], row["iterations"], row["target_met"]) == (r.num_tokens, r.iterations,
                                                                                r.target_met), key
            assert abs(row["l1"] - r.l1) < 1e-5 and abs(row["psnr"] - r.psnr) < 1e-4, key
    finally:
        engine.shutdown()
    assert (loaded.family.name == "karl") == all(r["positions"] is not None for r in rows.values())
    assert len({r["num_tokens"] for r in rows.values()}) > 1  # the target makes images halt apart
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["ok"] == 13
    assert manifest["model"]["fingerprint"] == loaded.fingerprint and manifest["target"] == want_target.to_dict()
    assert (tmp_path / "out" / "_tokens_histogram.png").read_bytes()[:4] == b"\x89PNG"


def test_rows_equal_what_the_http_service_answers(dataset, tmp_path, start_server):
    """The real service (uvicorn, the shipped model, its default settings) answers each image's bytes
    with the ids, probes and quality of the bulk row: token for token."""
    import httpx

    summary = tokenize_dataset(dataset, tmp_path / "out", model=str(ALIT), devices="cpu", quiet=True, max_l1=0.1)
    assert summary.exit_code == 0
    rows = read_rows(tmp_path / "out")
    srv = start_server(model=None)  # the service's own default: the shipped weights
    for (_, key), row in sorted(rows.items())[::2]:
        r = httpx.post(srv.url + "/v1/tokenize", files={"file": (Path(key).name, (dataset / key).read_bytes())},
                       data={"max_l1": "0.1"}, timeout=60)
        assert r.status_code == 200, r.text
        got = r.json()["results"][0]
        assert got["token_ids"] == row["token_ids"], key
        assert (got["num_tokens"], got["iterations"], got["target_met"]) == (row["num_tokens"], row["iterations"],
                                                                              row["target_met"]), key
        assert abs(got["l1"] - row["l1"]) < 1e-5, key
        assert (row["model"], row["fingerprint"]) == (r.json()["model"]["id"], r.json()["model"]["fingerprint"])


# ----- input kinds ----------------------------------------------------------------------------------------


def _as_webdataset(src: Path, dst: Path) -> list[Path]:
    """Two shards; each sample an image member (its key = the path without extension) and a `.cls`."""
    files = sorted(p for p in src.rglob("*") if p.is_file())
    shards = []
    for n, part in enumerate((files[:6], files[6:])):
        path = dst / f"shard-{n}.tar"
        with tarfile.open(path, "w") as tf:
            for p in part:
                rel = p.relative_to(src).as_posix()
                for name, data in ((rel, p.read_bytes()), (rel.rsplit(".", 1)[0] + ".cls", b"3")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        shards.append(path)
    return shards


def _as_parquet(src: Path, dst: Path) -> None:
    """Hugging Face's layout: an `image` struct {bytes, path} and a `name` column, in two files."""
    files = sorted(p for p in src.rglob("*") if p.is_file())
    for n, part in enumerate((files[:7], files[7:])):
        table = pa.table({
            "name": [p.relative_to(src).as_posix().rsplit(".", 1)[0] for p in part],
            "image": [{"bytes": p.read_bytes(), "path": p.name} for p in part],
        })
        pq.write_table(table, dst / f"train-{n:05d}.parquet", row_group_size=4)


def test_folder_list_webdataset_and_parquet_give_the_same_rows(dataset, tmp_path):
    kw = {"model": str(KARL), "devices": "cpu", "quiet": True, "max_l1": 0.5}
    folder = by_stem(read_rows(_run(dataset, tmp_path / "folder", **kw)))
    assert len(folder) == 13
    listing = tmp_path / "list.txt"
    listing.write_text("# images\n" + "\n".join(str(p) for p in sorted(dataset.rglob("*.*"))) + "\n\n")
    listed = read_rows(_run(listing, tmp_path / "listed", **kw))
    (tmp_path / "wds").mkdir()
    _as_webdataset(dataset, tmp_path / "wds")
    wds = read_rows(_run(str(tmp_path / "wds" / "shard-*.tar"), tmp_path / "wds-out", **kw))
    assert {s for s, _ in wds} == {"shard-0.tar", "shard-1.tar"}
    (tmp_path / "pq").mkdir()
    _as_parquet(dataset, tmp_path / "pq")
    hf = read_rows(_run(tmp_path / "pq", tmp_path / "pq-out", key_column="name", **kw))
    plain = read_rows(_run(tmp_path / "pq" / "train-00001.parquet", tmp_path / "pq-plain", **kw))
    assert sorted(k for _, k in plain) == [f"train-00001.parquet:{i}" for i in range(6)]
    for other in (by_stem({(None, str(Path(k).relative_to(dataset))): r for (_, k), r in listed.items()}),
                  by_stem(wds), by_stem(hf)):
        assert other.keys() == folder.keys()
        for k in folder:
            same_tokens(other[k], folder[k])


def _run(src, out, **kw) -> Path:
    summary = tokenize_dataset(src, out, **kw)
    assert summary.exit_code == 0, summary.line()
    return Path(out)


# ----- bad input, usage errors ---------------------------------------------------------------------------


def _bomb_png() -> bytes:
    """A valid PNG header claiming 30000 x 30000 pixels (no pixel data needed to be refused)."""
    data = _png(np.zeros((2, 2, 3), np.uint8))
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return data[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + data[33:]


def test_bad_images_are_rows_with_the_apis_errors_and_exit_1(dataset, tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    good = (dataset / "odd" / "large.jpg").read_bytes()
    png = (dataset / "odd" / "thin.png").read_bytes()
    bad = {"corrupt.png": os.urandom(600), "truncated.jpg": good[: len(good) // 2], "cut.png": png[: len(png) * 2 // 3],
           "empty.png": b"", "bomb.png": _bomb_png()}
    for name, data in bad.items():
        (src / name).write_bytes(data)
    (src / "ok.jpg").write_bytes(good)
    code = cli_main(["tokenize-dataset", str(src), str(tmp_path / "out"), "--model", str(ODP), "--devices", "cpu"])
    assert code == 1
    assert "6 rows, 1 ok, 5 failed" in capsys.readouterr().out
    rows = {k: r for (_, k), r in read_rows(tmp_path / "out").items()}
    intake = api_intake(resolve(str(ODP)).limits)
    for name, data in bad.items():
        with pytest.raises(ImageError) as e:
            asyncio.run(intake.image(data))
        assert (rows[name]["error_code"], rows[name]["error"]) == (e.value.code, e.value.message), name
        assert rows[name]["token_ids"] is None
    assert rows["ok.jpg"]["error"] is None and rows["ok.jpg"]["num_tokens"] > 0
    codes = json.loads((tmp_path / "out" / "_manifest.json").read_text())["counts"]["errors_by_code"]
    assert sum(codes.values()) == 5 and codes["invalid_image"] >= 2


def test_images_over_the_byte_limit_are_not_read_and_get_the_apis_error(dataset, tmp_path):
    """ALIT_MAX_IMAGE_BYTES: an image file or WebDataset member larger than the limit becomes an
    `image_too_large` row with the API's message, without its bytes being read into memory."""
    big = (dataset / "odd" / "large.jpg").read_bytes()
    small = (dataset / "odd" / "flat.png").read_bytes()
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.jpg").write_bytes(big)
    (src / "small.png").write_bytes(small)
    shard = tmp_path / "shard.tar"
    with tarfile.open(shard, "w") as tf:
        for name in ("big.jpg", "small.png"):
            tf.add(src / name, arcname=f"s/{name}")
    settings = Settings(max_image_bytes=len(big) - 1)
    with pytest.raises(ImageError) as want:  # what the API's check says of the same bytes
        open_image(big, ImageLimits(max_bytes=settings.max_image_bytes))
    for name, source in (("folder", src), ("tar", shard)):
        summary = tokenize_dataset(source, tmp_path / name, model=str(ODP), devices="cpu", quiet=True,
                                   settings=settings)
        assert summary.exit_code == 1 and (summary.counts["ok"], summary.counts["failed"]) == (1, 1), name
        rows = {k.rsplit("/", 1)[-1]: r for (_, k), r in read_rows(tmp_path / name).items()}
        big_row = rows["big.jpg" if name == "folder" else "big"]
        assert (big_row["error_code"], big_row["error"]) == (want.value.code, want.value.message), name


def test_unreadable_shards_and_parquet_files_are_named_and_exit_1(dataset, tmp_path, capsys):
    wds = tmp_path / "wds"
    wds.mkdir()
    first, second = _as_webdataset(dataset, wds)
    second.write_bytes(second.read_bytes()[:3000])  # cut inside its first member's data
    (wds / "shard-2.tar").write_bytes(b"not a tar at all" * 40)
    out = tmp_path / "out"
    code = cli_main(["tokenize-dataset", str(wds), str(out), "--model", str(KARL), "--devices", "cpu", "--quiet"])
    text = capsys.readouterr()
    assert code == 1 and "unreadable: shard-1.tar, shard-2.tar" in text.out
    manifest = json.loads((out / "_manifest.json").read_text())
    assert [u["path"] for u in manifest["unreadable_sources"]] == ["shard-1.tar", "shard-2.tar"]
    assert {s for s, _ in read_rows(out)} == {"shard-0.tar"} and manifest["counts"]["ok"] == 6

    pqdir = tmp_path / "pq"
    pqdir.mkdir()
    _as_parquet(dataset, pqdir)
    pq.write_table(pa.table({"pixels": [b"x"]}), pqdir / "train-00002.parquet")
    code = cli_main(["tokenize-dataset", str(pqdir), str(tmp_path / "pq-out"), "--model", str(KARL), "--quiet",
                     "--devices", "cpu"])
    assert code == 1 and "unreadable: train-00002.parquet" in capsys.readouterr().out
    assert len(read_rows(tmp_path / "pq-out")) == 13


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_usage_errors_are_one_line_and_exit_2_before_any_work(dataset, tmp_path, capsys):
    def run(*args: str) -> int:
        return cli_main(["tokenize-dataset", *args, "--devices", "cpu", "--quiet"])

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert run(str(dataset), str(blocker / "out"), "--model", str(KARL)) == 2  # OUT cannot be created
    assert "cannot create the output folder" in _one_line_error(capsys)
    out = tmp_path / "out"
    assert run(str(dataset), str(out), "--model", "preset:test_tiny", "--tokens", "33") == 2
    assert "tokens: must be a multiple of 32" in _one_line_error(capsys)
    assert run(str(dataset), str(out), "--model", str(KARL), "--min-psnr", "20") == 2
    assert "karl model does not take min_psnr" in _one_line_error(capsys)
    assert run(str(dataset), str(out), "--model", str(tmp_path / "no-weights")) == 2
    assert "cannot load the model" in _one_line_error(capsys)
    assert list(out.iterdir()) == []  # nothing was written
    (tmp_path / "empty").mkdir()
    assert run(str(tmp_path / "empty"), str(out), "--model", str(KARL)) == 2
    assert "no images" in _one_line_error(capsys)
    assert run(str(tmp_path / "missing"), str(out), "--model", str(KARL)) == 2
    assert "no such file or folder" in _one_line_error(capsys)
    pq.write_table(pa.table({"img": [b"x"]}), tmp_path / "data.parquet")
    assert run(str(tmp_path / "data.parquet"), str(out), "--model", str(KARL)) == 2
    assert "no column 'image' (columns: img; name it with --image-column)" in _one_line_error(capsys)
    (out / "something").write_text("x")
    assert run(str(dataset), str(out), "--model", str(KARL)) == 2
    assert "is not empty" in _one_line_error(capsys)


def test_a_bare_ray_flag_does_not_swallow_src():
    from service.bulk.cli import bare_ray

    assert bare_ray(["tokenize-dataset", "--ray", "photos/", "out/"]) == ["tokenize-dataset", "--ray=", "photos/",
                                                                          "out/"]
    for address in ("auto", "10.0.0.1:6379", "ray://head:10001"):
        assert bare_ray(["tokenize-dataset", "a", "b", "--ray", address])[-1] == address
    assert bare_ray(["tokenize-dataset", "a", "b", "--ray"])[-1] == "--ray"


def test_resume_refuses_another_model_or_target(dataset, tmp_path, capsys):
    out = tmp_path / "out"
    _run(dataset, out, model=str(ODP), devices="cpu", quiet=True, max_l1=0.2)
    before = read_rows(out)
    args = ["tokenize-dataset", str(dataset), str(out), "--devices", "cpu", "--quiet", "--resume"]
    assert cli_main([*args, "--model", str(ODP), "--max-l1", "0.3"]) == 2
    assert "another target" in _one_line_error(capsys)
    assert cli_main([*args, "--model", str(KARL), "--max-l1", "0.2"]) == 2
    assert "another model" in _one_line_error(capsys)
    assert cli_main([*args, "--model", str(ODP), "--max-l1", "0.2"]) == 0  # the same run: nothing left to do
    assert "0 images" in capsys.readouterr().out and read_rows(out) == before


# ----- kill -9, then --resume ---------------------------------------------------------------------------


def test_kill_9_at_a_random_point_then_resume_gives_every_image_once(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(3)
    for i in range(60):
        (src / f"{i:03d}.png").write_bytes(_png(rng.integers(0, 256, (16 + i % 5, 16, 3), dtype=np.uint8)))
    out = tmp_path / "out"
    args = [*CLI, "tokenize-dataset", str(src), str(out), "--model", "preset:test_tiny", "--devices", "cpu",
            "--shard-rows", "4", "--window", "4"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ALIT_TORCH_THREADS": "1", "ALIT_MAX_BATCH": "2"}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    shard = random.randint(0, 5)  # a random point: after one of the first shards (of 15), within a shard's time
    try:
        deadline = time.monotonic() + 120
        while not (out / f"part-{shard:05d}.parquet").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(random.uniform(0, 0.05))
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    killed_with = len(read_rows(out))
    assert 4 <= killed_with < 60 and killed_with % 4 == 0  # complete shards only
    resumed = subprocess.run([*args, "--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    rows = read_rows(out)  # fails on a key written twice
    assert sorted(k for _, k in rows) == [f"{i:03d}.png" for i in range(60)]
    assert all(r["error"] is None for r in rows.values())
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["counts"]["from_earlier_runs"] == killed_with and manifest["counts"]["rows"] == 60
    assert [r.get("status") for r in manifest["runs"]] == [None, "complete"]  # the killed run never finished


# ----- --cache: the service answers these images from the cache ---------------------------------------------


def test_cache_fills_the_services_trajectory_cache(dataset, tmp_path, own_redis):
    from service.api.cached_tokenize import TokenizePipeline
    from service.cache import make_cache

    target = {"max_l1": 0.2}
    summary = tokenize_dataset(dataset, tmp_path / "out", model=str(ODP), devices="cpu", quiet=True,
                               cache=own_redis.url, **target)
    assert summary.exit_code == 0
    run = json.loads((tmp_path / "out" / "_manifest.json").read_text())["runs"][-1]
    assert (run["cached"], run["cache_errors"], run["cache"]) == (13, 0, own_redis.url)
    rows = read_rows(tmp_path / "out")
    loaded = resolve(str(ODP))
    s = Settings()
    engine = Engine(loaded, EngineSettings(devices="cpu", warmup=False)).start()
    intake = api_intake(loaded.limits)

    async def served(data: bytes):
        cache = make_cache(own_redis.url, prefix=s.cache_prefix, ttl_s=s.cache_ttl_s)
        pipe = TokenizePipeline(engine, cache, loaded.limits.variant(s.halting))
        pixels, _ = await intake.image(data)
        try:
            return await pipe.tokenize(pixels, parse_target(target, loaded.limits, Target()), None)
        finally:
            await cache.close()

    try:
        for (_, key), row in rows.items():
            out = asyncio.run(served((dataset / key).read_bytes()))
            assert out.cached, key
            assert out.record.token_ids.tolist() == row["token_ids"]
    finally:
        engine.shutdown()


# ----- Ray: a two-node cluster on this machine ---------------------------------------------------------------


def test_ray_on_a_two_node_cluster_writes_the_local_runs_rows(dataset, tmp_path):
    from ray.cluster_utils import Cluster

    kw = {"model": str(ODP), "devices": "cpu", "quiet": True, "max_l1": 0.2}
    local = read_rows(_run(dataset, tmp_path / "local", **kw))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        summary = tokenize_dataset(dataset, tmp_path / "ray", ray=cluster.address, ray_actors=2,
                                   ray_cpus_per_actor=0.5, shard_rows=5, **kw)
        # a pool that leaves no CPU for the read tasks would wait forever: refused at once, exit 2
        with pytest.raises(BulkError, match="exceed the cluster's 2 CPUs"):
            tokenize_dataset(dataset, tmp_path / "ray_full", ray=cluster.address, ray_actors=2, ray_cpus_per_actor=1,
                             **kw)
    finally:
        import ray

        ray.shutdown()
        cluster.shutdown()
    assert summary.exit_code == 0, summary.line()
    remote = read_rows(tmp_path / "ray")
    assert remote.keys() == local.keys()
    for k in local:
        same_tokens(remote[k], local[k])
        assert remote[k]["fingerprint"] == local[k]["fingerprint"]
    manifest = json.loads((tmp_path / "ray" / "_manifest.json").read_text())
    assert manifest["runs"][-1]["ray"]["cluster_nodes"] == 2 and manifest["runs"][-1]["ray"]["actors"] == 2


def test_bulk_sits_beside_the_api_and_ray_stays_optional():
    code = ("import sys, service.bulk.cli, service.bulk.local, service.bulk.ray_run; "
            "print([m for m in sys.modules if m.startswith('service.api') or m == 'ray'])")
    out = subprocess.run([CLI[0], "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
