"""What SRC is, and its images as records: (source, key, bytes) or why they could not be read.

SRC may be
* a folder of images (recursive, sorted; key = the path relative to the folder), or one image file;
* a text file of image paths, one a line (blank lines and `#` comments skipped; relative paths are
  relative to the list's folder; key = the line as written);
* WebDataset shards: a `.tar` (also `.tar.gz`, `.tgz`), a folder of them or a glob. Members are grouped
  into samples by key, the member path up to the first dot of its file name (WebDataset's rule);
  a sample's image is its member with the first image extension in `IMAGE_EXTS` order;
* Parquet files (one, a folder of them or a glob) with an image column: binary, or a struct with a
  `bytes` field (how Hugging Face datasets store images); key = `--key-column`'s value, else `FILE:ROW`.

The input is cut into `Unit`s (some image files, one shard, one Parquet file), which the local
pipeline reads one after the other and a Ray job reads as parallel tasks; both read a unit with
`read_unit`. A record's `source` is the shard or Parquet file it came from (None for image files),
and (source, key) names one input image: duplicates within a source get `#2`, `#3`, ... appended, so
a resumed run can skip exactly the images that are done. A shard or Parquet file that cannot be read
(or stops being readable half way) yields an *unreadable* record (key None) naming it.
"""

from __future__ import annotations

import glob
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..imaging import ImageError, ImageLimits, check_size

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")  # a WebDataset sample's image, by preference
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
PARQUET_SUFFIXES = (".parquet", ".pq")
FILES_PER_UNIT = 64  # image files per unit (a Ray read task), at most
MIN_UNITS = 16  # ... and fewer when there are fewer than 16 x 64 files, so every Ray actor gets work
PARQUET_BATCH = 256  # rows read from a Parquet file at a time


class SourceError(ValueError):
    """SRC cannot be used at all (missing, empty, mixed kinds, no such column): a usage error."""


@dataclass(frozen=True)
class Record:
    """One input image (`key` set): its bytes, or the file to read them from (`path`), or `error`
    (with `error_code`) saying why there are none. `key` None: the source file `source` itself is
    unreadable, `error` says why."""

    key: str | None
    source: str | None = None
    data: bytes | None = None
    path: str | None = None
    error: str | None = None
    error_code: str | None = None
    max_bytes: int = ImageLimits().max_bytes  # an image file larger than this is not read

    @property
    def unreadable(self) -> bool:
        return self.key is None

    def read(self) -> bytes:
        """The image's bytes (an image file is read now, unless it is larger than the limit: then
        ImageError `image_too_large`, as the API answers); OSError when it cannot be read."""
        if self.data is not None:
            return self.data
        if self.path is None:
            raise OSError(self.error or "no image bytes")
        with open(self.path, "rb") as f:
            check_size(os.fstat(f.fileno()).st_size, ImageLimits(max_bytes=self.max_bytes))
            return f.read()

    def loaded(self) -> Record:
        """This record with its bytes read, or with the reason they cannot be (Ray reads on its nodes)."""
        if self.data is not None or self.error is not None or self.unreadable:
            return self
        try:
            return replace(self, data=self.read())
        except ImageError as e:
            return replace(self, error=e.message, error_code=e.code)
        except OSError as e:
            return replace(self, error=read_error(self.path, e), error_code="unreadable")


def read_error(path: str | None, e: OSError) -> str:
    """An image file's read failure, one line."""
    return f"cannot read {path}: {e.strerror or e}"


@dataclass(frozen=True)
class Unit:
    """A slice of the input read in one go: image files (`items`: (path, key)), one shard or one
    Parquet file (`path`, named `name` in rows). `skip`: keys of this unit already done (resume)."""

    kind: str  # files | tar | parquet
    path: str = ""
    name: str = ""
    items: tuple[tuple[str, str], ...] = ()
    skip: frozenset[str] = frozenset()
    image_column: str = "image"
    key_column: str | None = None
    max_bytes: int = ImageLimits().max_bytes  # larger image files and members are not read (ALIT_MAX_IMAGE_BYTES)


def _suffix(path: Path, suffixes: tuple[str, ...]) -> bool:
    return path.name.lower().endswith(suffixes)


def _is_image(path: Path) -> bool:
    return path.suffix.lower().lstrip(".") in IMAGE_EXTS


def _kind_of(path: Path) -> str | None:
    if _suffix(path, TAR_SUFFIXES):
        return "webdataset"
    if _suffix(path, PARQUET_SUFFIXES):
        return "parquet"
    if _is_image(path):
        return "folder"
    return None


def _unique(keys: list[str]) -> list[str]:
    """Keys made unique in order: the second `a` becomes `a#2`."""
    seen: dict[str, int] = {}
    out = []
    for k in keys:
        n = seen.get(k, 0) + 1
        seen[k] = n
        out.append(k if n == 1 else f"{k}#{n}")
    return out


@dataclass
class Source:
    """SRC resolved: its kind and its files (image files with their keys, or shards / Parquet files)."""

    src: str
    kind: str  # folder | list | webdataset | parquet
    root: Path  # names of sources are relative to it
    files: list[Path]
    keys: list[str] = field(default_factory=list)  # folder / list: one per file
    image_column: str = "image"
    key_column: str | None = None

    def name(self, path: Path) -> str:
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return path.as_posix()

    def units(self, done: dict[str | None, set[str]] | None = None) -> list[Unit]:
        """The units to read, leaving out the images in `done` (source -> keys)."""
        done = done or {}
        if self.kind in ("folder", "list"):
            skip = done.get(None, set())
            todo = [(str(p), k) for p, k in zip(self.files, self.keys) if k not in skip]
            step = max(1, min(FILES_PER_UNIT, -(-len(todo) // MIN_UNITS)))  # small inputs: still several units
            return [Unit("files", items=tuple(todo[i:i + step])) for i in range(0, len(todo), step)]
        kind = "tar" if self.kind == "webdataset" else "parquet"
        return [Unit(kind, path=str(p), name=self.name(p), skip=frozenset(done.get(self.name(p), set())),
                     image_column=self.image_column, key_column=self.key_column) for p in self.files]

    def total(self) -> int | None:
        """How many input images there are (None when that would cost a second read: compressed shards)."""
        if self.kind in ("folder", "list"):
            return len(self.files)
        n = 0
        for p in self.files:
            try:
                if self.kind == "parquet":
                    import pyarrow.parquet as pq

                    n += pq.ParquetFile(p).metadata.num_rows
                elif p.name.lower().endswith(".tar"):
                    with tarfile.open(p, "r:") as tf:  # headers only: member data is skipped by seeking
                        n += len(_samples([m.name for m in tf.getmembers() if m.isfile()]))
                else:
                    return None
            except Exception:  # unreadable: named when it is read
                continue
        return n

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"src": self.src, "kind": self.kind}
        if self.kind in ("webdataset", "parquet"):
            out["files"] = [self.name(p) for p in self.files]
        else:
            out["images"] = len(self.files)
        if self.kind == "parquet":
            out["image_column"] = self.image_column
            out["key_column"] = self.key_column
        return out


def open_source(src: str | os.PathLike, image_column: str = "image", key_column: str | None = None) -> Source:
    """SRC -> Source, or SourceError (nothing there, no inputs, or kinds mixed)."""
    text = str(src)
    path = Path(text)
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and _kind_of(p))
        root = path
    elif path.is_file():
        kind = _kind_of(path)
        if kind is None:
            return _list_source(text, path)
        found, root = [path], path.parent
    elif glob.has_magic(text):
        found = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file() and _kind_of(Path(p)))
        root = Path(os.path.commonpath([str(p.parent) for p in found])) if found else Path(".")
    else:
        raise SourceError(f"no such file or folder: {text}")
    kinds = {_kind_of(p) for p in found}
    if not found:
        raise SourceError(f"no images, .tar shards or Parquet files in {text} "
                          f"(image extensions: {', '.join(IMAGE_EXTS)})")
    if len(kinds) > 1:
        raise SourceError(f"{text} holds {' and '.join(sorted(str(k) for k in kinds))} inputs; point SRC at one kind "
                          "(a folder or a glob)")
    kind = kinds.pop()
    assert kind is not None
    source = Source(text, kind, root, found, image_column=image_column, key_column=key_column)
    if kind == "folder":
        source.keys = [source.name(p) for p in found]
    if kind == "parquet":
        _check_columns(source)
    return source


def _check_columns(source: Source) -> None:
    """SourceError when no Parquet file has the image column (a wrong --image-column, not bad data);
    a file of its own without it is named as unreadable when it is read. Stops at the first good file."""
    import pyarrow.parquet as pq

    problems = []
    for p in source.files:
        try:
            problem = _column_problem(pq.ParquetFile(p).schema_arrow, source.image_column, source.key_column)
        except Exception as e:  # unreadable: named when it is read
            problem = f"cannot read it ({e})"
        if problem is None:
            return
        problems.append(f"{source.name(p)}: {problem}")
    raise SourceError(problems[0] + (f" (and {len(problems) - 1} more files)" if len(problems) > 1 else ""))


def _list_source(text: str, path: Path) -> Source:
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SourceError(f"cannot read the list of images {text}: {e}") from None
    entries = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    if not entries:
        raise SourceError(f"{text} lists no images")
    files = [Path(e) if Path(e).is_absolute() else path.parent / e for e in entries]
    return Source(text, "list", path.parent, files, keys=_unique(entries))


# ----- reading --------------------------------------------------------------------------------------


def read_unit(unit: Unit) -> Iterator[Record]:
    """The unit's records, in order; image files are not read here (`Record.read` does it)."""
    if unit.kind == "files":
        for path, key in unit.items:
            yield Record(key, path=path, max_bytes=unit.max_bytes)
    elif unit.kind == "tar":
        yield from _read_tar(unit)
    elif unit.kind == "parquet":
        yield from _read_parquet(unit)
    else:
        raise ValueError(f"unknown unit kind {unit.kind!r}")


def _sample_key(member: str) -> tuple[str, str]:
    """WebDataset's split of a member path: (key, extension); the extension starts at the first dot
    of the file name."""
    head, _, base = member.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


def _samples(names: list[str]) -> list[str]:
    """Sample keys of consecutive member names (the order in the shard), made unique."""
    keys: list[str] = []
    last = None
    for name in names:
        key, _ = _sample_key(name)
        if key != last:
            keys.append(key)
            last = key
    return _unique(keys)


def _pick_image(unit: Unit, key: str, members: dict[str, bytes | ImageError]) -> Record:
    for ext in IMAGE_EXTS:
        if ext in members:
            data = members[ext]
            if isinstance(data, ImageError):
                return Record(key, unit.name, error=data.message, error_code=data.code)
            return Record(key, unit.name, data=data)
    return Record(key, unit.name, error=f"no image in this sample (members: {', '.join(sorted(members)) or 'none'}; "
                                       f"image extensions: {', '.join(IMAGE_EXTS)})", error_code="no_image")


def _read_tar(unit: Unit) -> Iterator[Record]:
    """A WebDataset shard, streamed: consecutive members with the same key are one sample."""
    seen: dict[str, int] = {}
    key: str | None = None
    members: dict[str, bytes | ImageError] = {}

    def finish() -> Record | None:
        assert key is not None
        n = seen.get(key, 0) + 1
        seen[key] = n
        name = key if n == 1 else f"{key}#{n}"
        if name in unit.skip:
            return None
        return _pick_image(unit, name, members)

    try:
        with tarfile.open(unit.path, "r|*") as tf:  # a stream: one pass, nothing seeks back
            for m in tf:
                if not m.isfile():
                    continue
                k, ext = _sample_key(m.name)
                if k != key:
                    if key is not None:
                        rec = finish()
                        if rec is not None:
                            yield rec
                    key, members = k, {}
                if ext in IMAGE_EXTS and ext not in members:
                    try:  # a member over the byte limit is skipped unread, with the API's error
                        check_size(m.size, ImageLimits(max_bytes=unit.max_bytes))
                        f = tf.extractfile(m)
                        members[ext] = f.read() if f is not None else b""
                    except ImageError as e:
                        members[ext] = e
                else:
                    members.setdefault(ext, b"")  # only its name matters
        if key is not None:
            rec = finish()
            if rec is not None:
                yield rec
    except (OSError, tarfile.TarError, EOFError) as e:  # truncated or not a tar: the samples so far stand
        yield Record(None, unit.name, error=f"cannot read {unit.name}: {e}", error_code="unreadable_source")


def _image_bytes(value: Any) -> bytes | None:
    if isinstance(value, dict):  # Hugging Face's Image feature: {"bytes": ..., "path": ...}
        value = value.get("bytes")
    return value


def _read_parquet(unit: Unit) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(unit.path)
        schema = pf.schema_arrow
        problem = _column_problem(schema, unit.image_column, unit.key_column)
        if problem:
            yield Record(None, unit.name, error=f"{unit.name}: {problem}", error_code="unreadable_source")
            return
        columns = [unit.image_column] + ([unit.key_column] if unit.key_column else [])
        seen: dict[str, int] = {}
        row = 0
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH, columns=columns):
            table = pa.Table.from_batches([batch])
            images = table.column(unit.image_column).to_pylist()
            keys = (table.column(unit.key_column).to_pylist() if unit.key_column
                    else [f"{unit.name}:{row + i}" for i in range(len(images))])
            for value, raw_key in zip(images, keys):
                row += 1
                key = str(raw_key)
                n = seen.get(key, 0) + 1
                seen[key] = n
                if n > 1:
                    key = f"{key}#{n}"
                if key in unit.skip:
                    continue
                data = _image_bytes(value)
                if data is None:
                    yield Record(key, unit.name, error=f"no image bytes in column {unit.image_column!r} of this row",
                                 error_code="no_image")
                else:
                    yield Record(key, unit.name, data=bytes(data))
    except (OSError, pa.ArrowException) as e:
        yield Record(None, unit.name, error=f"cannot read {unit.name}: {e}", error_code="unreadable_source")


def _column_problem(schema: Any, image_column: str, key_column: str | None) -> str | None:
    import pyarrow as pa

    names = schema.names
    if image_column not in names:
        return f"no column {image_column!r} (columns: {', '.join(names)}; name it with --image-column)"
    t = schema.field(image_column).type
    binary = (pa.types.is_binary(t) or pa.types.is_large_binary(t)
              or (hasattr(pa.types, "is_binary_view") and pa.types.is_binary_view(t)))
    if pa.types.is_struct(t):
        idx = t.get_field_index("bytes")
        ft = t.field(idx).type if idx >= 0 else None
        binary = ft is not None and (pa.types.is_binary(ft) or pa.types.is_large_binary(ft))
    if not binary:
        return f"column {image_column!r} is {t}; expected binary image bytes or a struct with a binary `bytes` field"
    if key_column is not None and key_column not in names:
        return f"no key column {key_column!r} (columns: {', '.join(names)})"
    return None


def records(units: list[Unit]) -> Iterator[Record]:
    for u in units:
        yield from read_unit(u)
