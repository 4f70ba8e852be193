"""Images in, tensors out: the one implementation of ALIT's preprocessing.

The reference (`evaluate_rfid.py`, custom-image branch) does: PIL open -> RGB, resize the shorter
side to the model size with PIL bicubic (antialiased), center crop, to float32 in [0, 1], CHW, no
mean/std normalisation. `preprocess` reproduces it bit for bit (tested on the fixture's `input`).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    if w <= h:
        new = (size, int(size * h / w))
    else:
        new = (int(size * w / h), size)
    return img if new == (w, h) else img.resize(new, Image.BICUBIC)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 (3, H, W) in [0, 1]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def preprocess(img: Image.Image, size: int) -> torch.Tensor:
    """An RGB PIL image -> the model's (3, size, size) input, as the reference prepares it."""
    return to_tensor(center_crop(resize_shorter_side(img.convert("RGB"), size), size))


def to_png(pixels: torch.Tensor) -> bytes:
    """(3, H, W) in [0, 1] -> PNG bytes."""
    import io

    arr = (pixels.detach().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy())
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()
