"""OUT: Parquet shards written atomically, the manifest, and what a resumed run finds there.

A shard is written to a hidden temporary file, fsynced and renamed to `part-NNNNN.parquet` (and the
folder fsynced), so OUT never holds a partial shard: after a crash, `kill -9` or a full disk it holds
complete shards and perhaps a temporary file, which the next run removes. Rows still in memory at
a crash are simply not there, and a resumed run computes them again.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from .rows import to_table

SHARD = re.compile(r"part-(\d{5,})\.parquet")
MANIFEST = "_manifest.json"  # "_" and "." names: Arrow and pandas read OUT as a dataset of the shards alone
HISTOGRAM = "_tokens_histogram.png"
TEMP_PREFIX = ".tmp-"


class OutputError(ValueError):
    """OUT cannot be used: not writable, not empty, or holding another run's output (a usage error)."""


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a folder be opened
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(path: Path, write) -> None:
    """`write(temp_path)` then fsync and rename to `path`: readers see the old file or the whole new one."""
    tmp = path.with_name(f"{TEMP_PREFIX}{os.getpid()}-{path.name}")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def write_json(path: Path, data: dict[str, Any]) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n"))


def shard_paths(out: Path) -> list[Path]:
    """OUT's shards in the order they were written (by number)."""
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := SHARD.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def ours(path: Path) -> bool:
    """A file a run writes into OUT (shards, manifest, histogram, temporary files)."""
    return bool(SHARD.fullmatch(path.name)) or path.name in (MANIFEST, HISTOGRAM) or path.name.startswith(TEMP_PREFIX)


def check_writable(out: Path) -> None:
    """OUT exists (created if need be) and takes a file; OutputError in one line otherwise."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the output folder {out}: {e.strerror or e}") from None
    if not out.is_dir():
        raise OutputError(f"{out} is not a folder")
    probe = out / f"{TEMP_PREFIX}{os.getpid()}-probe"
    try:
        with open(probe, "wb") as f:
            f.write(b"ok")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise OutputError(f"cannot write to the output folder {out}: {e.strerror or e}") from None


def clean_temporary(out: Path) -> None:
    for p in out.iterdir():
        if p.name.startswith(TEMP_PREFIX):
            with contextlib.suppress(OSError):
                p.unlink()


def clear(out: Path) -> None:
    """--overwrite: remove what an earlier run wrote (only ours)."""
    for p in out.iterdir():
        if p.is_file() and ours(p):
            p.unlink()


def read_manifest(out: Path) -> dict[str, Any] | None:
    path = out / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise OutputError(f"cannot read {path}: {e}") from None


def read_done(out: Path) -> tuple[dict[str | None, set[str]], list[dict[str, Any]], int]:
    """What the complete shards in OUT hold: (source -> keys done, per row {num_tokens, error_code},
    the number the next shard gets)."""
    done: dict[str | None, set[str]] = {}
    stats: list[dict[str, Any]] = []
    paths = shard_paths(out)
    for p in paths:
        try:
            t = pq.read_table(p, columns=["source", "key", "num_tokens", "error_code"])
        except Exception as e:  # a complete shard that no longer reads: the user must decide
            raise OutputError(f"cannot read the shard {p}: {e}") from None
        for row in t.to_pylist():
            done.setdefault(row["source"], set()).add(row["key"])
            stats.append({"num_tokens": row["num_tokens"], "error_code": row["error_code"]})
    nxt = int(SHARD.fullmatch(paths[-1].name).group(1)) + 1 if paths else 0  # type: ignore[union-attr]
    return done, stats, nxt


class ShardWriter:
    """Rows in, `part-NNNNN.parquet` out every `shard_rows` rows (and at `close`)."""

    def __init__(self, out: Path, shard_rows: int, first: int = 0):
        self.out = out
        self.shard_rows = shard_rows
        self.index = first
        self.rows: list[dict[str, Any]] = []
        self.written: list[str] = []

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if len(self.rows) >= self.shard_rows:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        table = to_table(self.rows)
        path = self.out / f"part-{self.index:05d}.parquet"
        write_atomic(path, lambda tmp: pq.write_table(table, tmp))
        self.written.append(path.name)
        self.index += 1
        self.rows = []
