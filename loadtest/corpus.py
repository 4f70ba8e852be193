"""Images of varied complexity for load tests: the held-out fixture photos, crops of them at several
scales, flat colours and noise (the benchmark's corpus, `service.bench.workload`). Nothing downloaded."""

from __future__ import annotations

import io
import sys
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.bench import DEFAULT_IMAGES as PHOTOS  # noqa: E402
from service.bench import workload  # noqa: E402


def photos() -> list[tuple[str, Image.Image]]:
    return workload.load_folder(PHOTOS)


def corpus(n_crops: int = 24, seed: int = 0) -> list[tuple[str, Image.Image]]:
    return workload.corpus(photos(), n_crops, seed)


random_crop = workload.random_crop


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()
