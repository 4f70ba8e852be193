"""A larger training corpus of photographs and natural textures that Debian packages ship (issue 25).

`build_corpus` finds the image files of installed Debian packages with `dpkg -L` (no file path is
written down here), decodes them, drops what is unreadable, too small or the same picture again
(packages ship one photograph at several resolutions), downsizes the rest to a compact cache and
writes `OUT/images/<package>/*` plus `OUT/corpus.json` (per file: package, package version,
original path, licence, original and cached size, sha256). Nothing is downloaded from anywhere but
Debian's archive (`make corpus` apt-get installs the packages). `data.load_sources(corpus_dir)`
adds the cached images to the training sources.

Which files of a package are taken is a rule per package (`Package.include`, a regular expression
on the installed path) written down in `PACKAGES` below with the reason, because the wallpaper
packages mix photographs with vector art and abstract renders; only raster files are read (SVG never).

    python -m service.training corpus [--out runs/corpus] [--packages P ...] [--skip-missing]
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import re
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

MANIFEST = "corpus.json"
FORMAT_VERSION = 2  # bump when what a build writes changes: a cached corpus is rebuilt
RASTER = frozenset({".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp"})
MAX_SIDE = 512  # cached images: shorter side at most this many pixels (never upscaled)
MIN_SIDE = 400  # source images with a shorter side below this are skipped as too small
JPEG_QUALITY = 92


@dataclass(frozen=True)
class Package:
    name: str
    licence: str  # as the package's /usr/share/doc/PKG/copyright states it (per file where it says so)
    holds: str  # what the taken files are, and why others are left out
    include: str | None = None  # regex (re.search) on the installed path; None = every raster file
    texture: bool = False  # cached as PNG (lossless) instead of JPEG
    default: bool = True  # part of `make corpus` / DEFAULT
    download_mb: float = 0.0  # the .deb's size in Debian 12 (bookworm), for the docs


_PLASMA_PHOTOS = ("BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf",
                  "Grey", "Kite", "OneStandsOut", "Path", "summer_1am")
_LXQT_PHOTOS = ("Butterfly-Kenneth-Wimer", "Valendas", "after-the-rain", "appleflower", "beam", "butterfly",
                "cloud", "drop", "flowers", "fog", "this-is-not-windows")

PACKAGES: tuple[Package, ...] = (
    Package("mate-backgrounds", "GPL-2+",
            "12 nature photographs (flowers, leaves, grass, a ladybird, water drops, dunes, storm, wood); "
            "its abstract/ and desktop/ wallpapers (renders, stripes, logos) are left out",
            include=r"/nature/", download_mb=46.6),
    Package("lomiri-wallpapers-16.04", "CC-BY-4.0 / CC-BY-SA-4.0 / CC0-1.0, per file",
            "15 Ubuntu Touch community wallpapers, 13 of them photographs (mountains, a river, a fig, "
            "brushes, dogs, dandelions, a dragonfly, a bridge) and 2 abstract; all taken",
            download_mb=15.8),
    Package("plasma-workspace-wallpapers", "GPL-2+ (each wallpaper's metadata.json: LGPLv3)",
            "the 11 photographs among KDE Plasma's 30 wallpapers (boats, jetties, cups, leaves, a forest path, "
            "a kite, moss, a lake at night), each shipped at ~12 resolutions; the 19 renders are left out",
            include=r"/wallpapers/(" + "|".join(_PLASMA_PHOTOS) + r")/contents/images/", download_mb=94.0),
    Package("lxqt-themes", "LGPL-2.1+ (its wallpapers/License file: CC-BY-SA-3.0)",
            "the 11 photographs among LXQt's 24 wallpapers (butterflies, mountains, clouds, blossom, fog, "
            "a water drop, hills); logo and origami/triangle art left out",
            include=r"/wallpapers/(" + "|".join(_LXQT_PHOTOS) + r")\.[a-z]+$", download_mb=25.8),
    Package("tuxpaint-data", "GPL-2+",
            "Tux Paint's 19 photo templates (bark, a cliff, a corn maze, jellyfish, a lighthouse, waves, "
            "redwoods, rocks, sheep, a spider's web, a mill machine); its drawings are left out",
            include=r"/tuxpaint/templates/", download_mb=7.9),
    Package("mypaint-data-extras", "CC0-1.0",
            "17 scanned paper, canvas and cork textures (MyPaint backgrounds; one is under 400 px)",
            include=r"/mypaint/backgrounds/", texture=True, download_mb=2.9),
    Package("stellarium-data", "GPL-2+",
            "Optional (not in DEFAULT): 555 telescope photographs of nebulae, galaxies and clusters "
            "(333 at >= 400 px), mostly black sky; add with --packages",
            include=r"/nebulae/", default=False, download_mb=246.3),
)
BY_NAME = {p.name: p for p in PACKAGES}
DEFAULT: tuple[str, ...] = tuple(p.name for p in PACKAGES if p.default)


class MissingPackages(RuntimeError):
    pass


# ----- dpkg ------------------------------------------------------------------------------------


def installed_version(package: str) -> str | None:
    """The installed version of a Debian package, or None when it is not installed."""
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Status}\t${Version}", package],
                             capture_output=True, text=True, check=False)
    except FileNotFoundError:  # no dpkg on this machine
        return None
    if out.returncode != 0 or "\t" not in out.stdout:
        return None
    status, version = out.stdout.split("\t", 1)
    return version.strip() if status.endswith(" installed") else None


def package_files(package: str) -> list[Path]:
    """The installed raster image files of a package (`dpkg -L`) that its `include` rule keeps; a
    symlink counts once with its target (Plasma links 11 of every wallpaper's 12 sizes to one file)."""
    out = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, check=True)
    rule = BY_NAME[package].include if package in BY_NAME else None
    files: dict[Path, Path] = {}  # resolved target -> listed path (a plain file's own path first)
    for line in sorted(out.stdout.splitlines(), key=lambda s: (Path(s.strip()).is_symlink(), s)):
        p = Path(line.strip())
        if p.suffix.lower() not in RASTER or (rule and not re.search(rule, str(p))) or not p.is_file():
            continue
        files.setdefault(p.resolve(), p)
    return sorted(files.values())


@dataclass(frozen=True)
class Paragraph:
    patterns: list[str]  # Files: (source-tree globs)
    licence: str  # License: short name
    copyright: str  # Copyright: holders, one line


def copyright_paragraphs(package: str) -> list[Paragraph]:
    """The Files paragraphs of a machine-readable /usr/share/doc/PKG/copyright (DEP-5), in order
    (`debian/*` ones left out); [] when the file is missing or free-form."""
    path = Path("/usr/share/doc") / package / "copyright"
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    out = []
    for para in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for line in para.splitlines():
            if line[:1] in (" ", "\t") and key:
                fields[key] += "\n" + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                fields[key] = value.strip()
        if "files" in fields and "license" in fields:
            patterns = [p for p in fields["files"].split() if not p.startswith("debian/")]
            licence = fields["license"].split("\n", 1)[0].strip()
            holders = "; ".join(x.strip() for x in fields.get("copyright", "").split("\n") if x.strip())
            if patterns and licence:
                out.append(Paragraph(patterns, licence, holders))
    return out


def licence_of(path: Path, paragraphs: list[Paragraph], fallback: str) -> tuple[str, str]:
    """(licence, copyright holders) that debian/copyright gives a file: the last paragraph whose
    pattern matches the end of the installed path (patterns name source-tree paths), or its file
    name when the pattern names one; (`fallback`, "") when none does."""
    found = (fallback, "")
    s = str(path)
    for para in paragraphs:
        for pat in para.patterns:
            base = pat.rsplit("/", 1)[-1]
            if fnmatch.fnmatchcase(s, "*/" + pat) or (base != "*" and fnmatch.fnmatchcase(path.name, base)):
                found = (para.licence, para.copyright)
                break
    return found


# ----- decoding, identity ----------------------------------------------------------------------


def _open(path: Path, target: int | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """(decoded image, its original size). Decodes fully (raises on a corrupt or truncated file);
    a JPEG decodes at a reduced DCT scale, at least twice `target` (the shorter side wanted)."""
    im: Image.Image = Image.open(path)
    size = im.size
    if target and im.format == "JPEG" and min(size) > 2 * target:
        s = 2 * target / min(size)
        im.draft("RGB", (max(1, round(size[0] * s)), max(1, round(size[1] * s))))
    im.load()
    return im, size


def _flatten(im: Image.Image) -> Image.Image:
    """RGB, or L for grey images; transparency composited on white (as data.load_sources does)."""
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        grey = im.mode == "LA"
        im = Image.alpha_composite(bg, im.convert("RGBA"))
        return im.convert("L" if grey else "RGB")
    if im.mode in ("L", "1", "I", "I;16", "F"):
        if im.mode in ("I", "I;16", "F"):
            arr = np.asarray(im, dtype=np.float64)
            hi = float(arr.max()) or 1.0
            return Image.fromarray(np.clip(arr * (255.0 / hi if hi > 255 else 1.0), 0, 255).astype(np.uint8))
        return im.convert("L")
    return im.convert("RGB")


THUMB = 128  # side of the dedupe thumbnails


def _thumb(im: Image.Image) -> np.ndarray:
    """A THUMB x THUMB colour thumbnail of the whole picture (aspect ignored, box filter), for dedupe."""
    return np.asarray(im.convert("RGB").resize((THUMB, THUMB), Image.Resampling.BOX), dtype=np.uint8)


@dataclass(frozen=True)
class _Signature:
    colour: np.ndarray  # (192,) the thumbnail's 8x8 block colours
    detail: np.ndarray  # (THUMB * THUMB,) its fine structure (grey minus 8x8-pixel block means), unit length or 0
    flat: bool  # no fine structure at all


def _signature(t: np.ndarray, k: int = 8) -> _Signature:
    n = t.shape[0]
    colour = t.astype(np.float64).reshape(8, n // 8, 8, n // 8, 3).mean(axis=(1, 3)).ravel()
    g = t.astype(np.float64).mean(axis=2)
    d = (g - g.reshape(n // k, k, n // k, k).mean(axis=(1, 3)).repeat(k, 0).repeat(k, 1)).ravel()
    d -= d.mean()
    norm = float(np.sqrt((d * d).sum()))
    return _Signature(colour, d / norm if norm >= 1.0 else np.zeros_like(d), norm < 1.0)


MAX_COLOUR_DIFF = 4.0
MIN_DETAIL_CORR = 0.85


def _twins(s: _Signature, kept: list[_Signature]) -> list[int]:
    """Indices of the signatures in `kept` that show the same picture as `s` (see same_picture)."""
    if not kept:
        return []
    colours = np.stack([k.colour for k in kept])
    close = np.flatnonzero(np.abs(colours - s.colour).mean(axis=1) <= MAX_COLOUR_DIFF)
    out = []
    for i in close:
        k = kept[i]
        if (s.flat and k.flat) or float(s.detail @ k.detail) >= MIN_DETAIL_CORR:
            out.append(int(i))
    return out


def same_picture(a: np.ndarray, b: np.ndarray) -> bool:
    """Two thumbnails show the same picture: their 8x8 block colours differ by at most
    MAX_COLOUR_DIFF (mean absolute, 0-255) and their fine structures (grey minus 8x8-pixel block
    means) correlate at least MIN_DETAIL_CORR (two pictures with no structure at all pass on colour
    alone). Measured on the corpus and on stellarium-data's 555 nebula photographs: a copy rescaled
    to 3/4 and re-saved as JPEG 85 scores >= 0.93, different pictures of the same colours (two
    globular clusters, two paper textures) <= 0.77."""
    return bool(_twins(_signature(a), [_signature(b)]))


_RES = re.compile(r"[_\-.]?\d{3,5}x\d{3,5}(?=$|[_\-./])", re.IGNORECASE)


def name_key(path: Path) -> str:
    """A file's path with resolution tokens (`_1920x1080`, a stem `2560x1600`) taken out: files of
    one package that agree on it are the same picture at different sizes."""
    return _RES.sub("", str(path.with_suffix("")))


def _slug(path: Path) -> str:
    stem = path.stem
    if sum(c.isalpha() for c in stem) < 3:  # e.g. Plasma's 2560x1600.jpg: name it after its wallpaper
        generic = {"images", "contents", "backgrounds", "background", "wallpapers", "share", "usr"}
        for parent in path.parents:
            if parent.name and parent.name.lower() not in generic and sum(c.isalpha() for c in parent.name) >= 3:
                stem = f"{parent.name}-{stem}"
                break
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("_") or "image"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----- building --------------------------------------------------------------------------------


@dataclass
class _Candidate:
    package: str
    path: Path
    size: tuple[int, int]
    sig: _Signature


@dataclass
class _Report:
    found: int = 0
    unreadable: list[str] = field(default_factory=list)
    tiny: list[str] = field(default_factory=list)
    duplicate: list[str] = field(default_factory=list)


def _settings(packages: list[str], max_side: int, min_side: int, quality: int) -> dict:
    return {"format": FORMAT_VERSION, "packages": packages, "max_side": max_side, "min_side": min_side,
            "jpeg_quality": quality,
            "include": {p: (BY_NAME[p].include if p in BY_NAME else None) for p in packages}}


def _cached(out: Path, settings: dict, versions: dict[str, str | None]) -> dict | None:
    """The existing manifest when it was built with these settings from these package versions
    and every file it lists is there unchanged; else None."""
    try:
        man = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if man.get("settings") != settings or man.get("versions") != versions:
        return None
    for f in man.get("files", []):
        p = out / f["file"]
        if not p.is_file() or p.stat().st_size != f["bytes"] or _sha256(p) != f["sha256"]:
            return None
    return man


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    tmp.replace(path)


def build_corpus(out_dir: str | Path, packages: list[str] | tuple[str, ...] = DEFAULT, max_side: int = MAX_SIDE,
                 min_side: int = MIN_SIDE, skip_missing: bool = False, quality: int = JPEG_QUALITY,
                 log: Callable[[str], None] | None = None) -> dict:
    """Build (or find cached) the corpus of `packages` in `out_dir`; returns the manifest.

    Every installed raster image a package's rule keeps is decoded; unreadable files and files with
    a shorter side under `min_side` are skipped and reported; files showing the same picture (same
    path up to a resolution token, or `same_picture` thumbnails) keep only the one with the most
    pixels; the rest are downsized (Lanczos) to a shorter side of at most `max_side` and cached as
    JPEG (`quality`, 4:4:4) or, for texture packages, PNG. A missing package raises
    `MissingPackages` naming the `apt-get install` command, or with `skip_missing` is left out with a
    warning. An existing manifest built from the same settings and package versions, whose files
    are all present and unchanged, is returned as is (nothing written)."""
    say = log or (lambda msg: None)  # progress lines
    out = Path(out_dir)
    packages = list(dict.fromkeys(packages))
    versions = {p: installed_version(p) for p in packages}
    missing = [p for p, v in versions.items() if v is None]
    if missing and not skip_missing:
        raise MissingPackages(f"Debian package(s) not installed: {' '.join(missing)}; install them with "
                              f"`apt-get install {' '.join(missing)}` (as root), or pass --skip-missing")
    for p in missing:
        warnings.warn(f"corpus: {p} is not installed, skipped (apt-get install {p})", stacklevel=2)
    settings = _settings(packages, max_side, min_side, quality)
    man = _cached(out, settings, versions)
    if man is not None:
        man["cached"] = True
        return man

    reports = {p: _Report() for p in packages}
    cands: list[_Candidate] = []
    for pkg in packages:
        if versions[pkg] is None:
            continue
        files = package_files(pkg)
        reports[pkg].found = len(files)
        say(f"{pkg}: {len(files)} image files")
        for path in files:
            try:
                im, size = _open(path, target=THUMB)
                sig = _signature(_thumb(_flatten(im)))
            except Exception as e:  # any decoder error means: unreadable
                reports[pkg].unreadable.append(f"{path}: {type(e).__name__}: {e}")
                continue
            if min(size) < min_side:
                reports[pkg].tiny.append(f"{path}: {size[0]}x{size[1]}")
                continue
            cands.append(_Candidate(pkg, path, size, sig))

    # Same picture: one package's files that agree on name_key, or any two with same_picture thumbs.
    order = sorted(range(len(cands)), key=lambda i: (-cands[i].size[0] * cands[i].size[1], str(cands[i].path)))
    kept: list[_Candidate] = []
    by_key: dict[tuple[str, str], _Candidate] = {}
    for i in order:
        c = cands[i]
        key = (c.package, name_key(c.path))
        twin = by_key.get(key)
        if twin is None:
            near = _twins(c.sig, [k.sig for k in kept])
            twin = kept[near[0]] if near else None
        if twin is not None:
            reports[c.package].duplicate.append(f"{c.path} (same picture as {twin.path})")
            continue
        by_key[key] = c
        kept.append(c)
    kept.sort(key=lambda c: (packages.index(c.package), str(c.path)))

    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # incomplete until the new manifest is written
    paragraphs = {p: copyright_paragraphs(p) for p in packages if versions[p] is not None}
    entries: list[dict[str, Any]] = []
    names: set[str] = set()
    for c in kept:
        entry = BY_NAME.get(c.package)
        texture = bool(entry and entry.texture)
        im = _flatten(_open(c.path, target=max_side)[0])
        w, h = im.size
        if min(w, h) > max_side:
            s = max_side / min(w, h)
            im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.LANCZOS)
        ext = ".png" if texture else ".jpg"
        name = f"{c.package}/{_slug(c.path)}{ext}"
        if name in names:
            name = f"{c.package}/{_slug(c.path)}-{hashlib.sha1(str(c.path).encode()).hexdigest()[:6]}{ext}"
        names.add(name)
        dest = out / "images" / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        buf = BytesIO()
        if texture:
            im.save(buf, format="PNG")
        else:
            im.save(buf, format="JPEG", quality=quality, subsampling=0, optimize=True)
        data = buf.getvalue()
        _atomic_write(dest, data)
        fallback = entry.licence if entry else "see /usr/share/doc/" + c.package + "/copyright"
        licence, holders = licence_of(c.path, paragraphs.get(c.package, []), fallback)
        entries.append({
            "file": f"images/{name}", "package": c.package, "version": versions[c.package],
            "path": str(c.path), "licence": licence, "copyright": holders,
            "size": list(c.size), "cached_size": list(im.size), "mode": im.mode,
            "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
        })
    # Files of an earlier build that this one does not list.
    listed = {e["file"] for e in entries}
    for f in sorted((out / "images").rglob("*"), reverse=True):
        if f.is_file() and f.relative_to(out).as_posix() not in listed:
            f.unlink()
        elif f.is_dir() and not any(f.iterdir()):
            f.rmdir()

    pkg_out = {}
    for p in packages:
        r = reports[p]
        entry = BY_NAME.get(p)
        pkg_out[p] = {
            "installed": versions[p] is not None, "version": versions[p],
            "licence": entry.licence if entry else None, "holds": entry.holds if entry else None,
            "found": r.found, "kept": sum(e["package"] == p for e in entries),
            "bytes": sum(e["bytes"] for e in entries if e["package"] == p),
            "duplicates": r.duplicate, "unreadable": r.unreadable, "too_small": r.tiny,
        }
    man = {
        "settings": settings, "versions": versions,
        "packages": pkg_out,
        "files": entries,
        "totals": {"files": len(entries), "bytes": sum(e["bytes"] for e in entries),
                   "found": sum(r.found for r in reports.values()),
                   "duplicates": sum(len(r.duplicate) for r in reports.values()),
                   "unreadable": sum(len(r.unreadable) for r in reports.values()),
                   "too_small": sum(len(r.tiny) for r in reports.values()),
                   "missing": missing},
    }
    _atomic_write(out / MANIFEST, (json.dumps(man, indent=1) + "\n").encode())
    man["cached"] = False
    return man


def load_manifest(corpus_dir: str | Path) -> dict:
    path = Path(corpus_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{corpus_dir} holds no {MANIFEST}: build it with `python -m service.training corpus`")
    man: dict = json.loads(path.read_text())
    return man


def licence_lines(corpus_dir: str | Path) -> list[str]:
    """Markdown lines for a model card: one per package the corpus took images from (version,
    count, the licence as the package states it, the per-file licences of its debian/copyright and
    their copyright holders), then the count of images per licence."""
    man = load_manifest(corpus_dir)
    lines = []
    for name, p in man["packages"].items():
        files = [e for e in man["files"] if e["package"] == name]
        if not files:
            continue
        per_file: dict[str, int] = {}
        for e in files:
            per_file[e["licence"]] = per_file.get(e["licence"], 0) + 1
        holders = list(dict.fromkeys(h for e in files for h in e.get("copyright", "").split("; ") if h))
        lines.append(
            f"- Debian package `{name}` {p['version']}: {len(files)} images; licence {p['licence'] or '-'} "
            f"(`/usr/share/doc/{name}/copyright`, per file: "
            + ", ".join(f"{k} {v}" for k, v in sorted(per_file.items())) + ")"
            + (f"; copyright {'; '.join(holders)}" if holders else ""))
    counts: dict[str, int] = {}
    for e in man["files"]:
        counts[e["licence"]] = counts.get(e["licence"], 0) + 1
    if counts:
        lines.append(f"- Corpus images by licence ({len(man['files'])} in all): "
                     + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return lines


# ----- command ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m service.training corpus",
                                 description="Build the training corpus from installed Debian packages (cached).")
    ap.add_argument("--out", default="runs/corpus", help="corpus directory (default runs/corpus)")
    ap.add_argument("--packages", nargs="+", default=list(DEFAULT),
                    help=f"Debian packages (default: {' '.join(DEFAULT)})")
    ap.add_argument("--skip-missing", action="store_true", help="leave out packages that are not installed")
    ap.add_argument("--max-side", type=int, default=MAX_SIDE, help="cached shorter side at most (px)")
    ap.add_argument("--min-side", type=int, default=MIN_SIDE, help="skip sources with a shorter side below (px)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        man = build_corpus(args.out, args.packages, max_side=args.max_side, min_side=args.min_side,
                           skip_missing=args.skip_missing, log=lambda m: print(m, file=sys.stderr))
    except MissingPackages as e:
        print(f"corpus: {e}", file=sys.stderr)
        return 1
    from .data import SAMPLES, bundle_samples

    copied = bundle_samples(args.out)  # the sample images travel with the corpus (another machine's
    # scikit-image may lack some): data.load_sources reads them from there when the package lacks them
    print(f"{'package':30s} {'version':24s} {'found':>5s} {'kept':>4s} {'dup':>4s} {'small':>5s} {'bad':>3s} "
          f"{'MB':>6s}  licence")
    for name, p in man["packages"].items():
        if not p["installed"]:
            print(f"{name:30s} {'(not installed: skipped)':24s}")
            continue
        print(f"{name:30s} {p['version']:24s} {p['found']:5d} {p['kept']:4d} {len(p['duplicates']):4d} "
              f"{len(p['too_small']):5d} {len(p['unreadable']):3d} {p['bytes'] / 1e6:6.2f}  {p['licence']}")
    t = man["totals"]
    print(f"total: {t['files']} images, {t['bytes'] / 1e6:.2f} MB in {Path(args.out) / 'images'}; "
          + ("cached (nothing rebuilt)" if man["cached"] else f"built in {time.perf_counter() - t0:.1f} s"))
    print(f"sample images copied to {Path(args.out) / SAMPLES}: {copied} written")
    return 0


__all__ = ["DEFAULT", "PACKAGES", "MissingPackages", "build_corpus", "licence_lines", "load_manifest", "main"]
