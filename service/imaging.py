"""Images in, tensors out: safe decoding and the one implementation of ALIT's preprocessing.

`decode_image` turns untrusted bytes into an RGB PIL image: byte and pixel limits are checked from
the header before any pixel is decoded (decompression bombs), only as many pixels as the model input
needs are decoded when asked (`min_side`: JPEG DCT scaling, else an integer `reduce`; the API asks
for `ALIT_DECODE_SCALE` x the model's input side, see docs/intake.md), EXIF orientation is applied, the first
frame of an animation is used, and every mode becomes RGB (alpha composited on white; 16-bit and
float images scaled; CMYK, palette, grayscale converted). Failures raise `ImageError` with a code
that names the reason (the API maps codes to HTTP statuses). The API and the Triton model both use it.

The reference (`evaluate_rfid.py`, custom-image branch) does: PIL open -> RGB, resize the shorter
side to the model size with PIL bicubic (antialiased), center crop, to float32 in [0, 1], CHW, no
mean/std normalisation. `preprocess` reproduces it bit for bit (tested on the fixture's `input`).
It is the only preprocessing in the project: the API, the Triton model, training, evaluation and
the benchmark all call it (`tests/test_preprocessing.py` checks they agree on odd aspect ratios).
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError


class ImageError(ValueError):
    """An image the service cannot use. `code` names why: `empty_image`, `image_too_large` (bytes or
    pixels beyond the limits), `unsupported_image` (not a supported format) or `invalid_image`
    (a supported format, but corrupt or of unusable shape)."""

    CODES = ("empty_image", "image_too_large", "unsupported_image", "invalid_image")

    def __init__(self, code: str, message: str):
        if code not in self.CODES:
            raise ValueError(f"unknown ImageError code {code!r}")
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_side: int = 20_000
    max_aspect: float = 32.0  # beyond it the resized long side explodes (1x20000 -> 64x1280000)


FORMATS = {"PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "MPO"}
DCT_SCALED = {"JPEG", "MPO"}  # decoded at 1/2, 1/4 or 1/8 scale when asked ("draft" mode)
REDUCE_MARGIN = 2  # other formats: box-reduced only down to twice the asked shorter side


def check_size(n: int, limits: ImageLimits) -> None:
    """An image of `n` bytes is within the limit (checked before reading a file or archive member)."""
    if n > limits.max_bytes:
        raise ImageError("image_too_large", f"image is {n} bytes; the limit is {limits.max_bytes}")


def open_image(data: bytes, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Untrusted bytes -> a PIL image whose header (format, size) is read and checked against the
    limits, no pixel decoded yet; or ImageError."""
    if not data:
        raise ImageError("empty_image", "the image is empty (0 bytes)")
    check_size(len(data), limits)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError("image_too_large", f"image dimensions are too large ({e})") from None
    except UnidentifiedImageError:
        raise ImageError("unsupported_image",
                         "not a recognised image (supported: PNG, JPEG, WebP, GIF, BMP, TIFF)") from None
    except Exception as e:
        raise ImageError("invalid_image", f"cannot read the image header: {e}") from None
    if img.format not in FORMATS:
        raise ImageError("unsupported_image",
                         f"image format {img.format} is not supported (supported: {', '.join(sorted(FORMATS))})")
    w, h = img.size
    if w < 1 or h < 1:
        raise ImageError("invalid_image", f"image has no pixels ({w}x{h})")
    if w * h > limits.max_pixels or max(w, h) > limits.max_side:
        raise ImageError("image_too_large",
                         f"image is {w}x{h}; the limits are {limits.max_pixels} pixels and {limits.max_side} per side")
    if max(w, h) / min(w, h) > limits.max_aspect:
        raise ImageError("invalid_image",
                         f"image is {w}x{h}: aspect ratio beyond {limits.max_aspect:g}:1 is not supported")
    return img


def plan_decode(img: Image.Image, min_side: int | None) -> int:
    """Prepare a header-read image to be decoded at no more pixels than needed for a shorter side of
    at least `min_side` (None: full size): JPEG decodes at 1/2, 1/4 or 1/8 scale (DCT scaling, "draft
    mode"), which changes `img.size` now. Returns the bytes the decoded pixels will take (4 per pixel,
    as Pillow stores RGB), for the caller's decode-memory budget."""
    if min_side is not None and img.format in DCT_SCALED:
        w, h = img.size
        k = min_side / min(w, h)
        if k < 1:
            img.draft(img.mode, (max(1, math.ceil(w * k)), max(1, math.ceil(h * k))))
    w, h = img.size
    return w * h * 4


def load_image(img: Image.Image, min_side: int | None = None) -> Image.Image:
    """Decode an image from `open_image` (after `plan_decode`) -> RGB; EXIF orientation applied, the
    first frame of an animation. Formats without DCT scaling are shrunk by an integer box `reduce`
    after decoding, to a shorter side of no less than 2 x `min_side`; corrupt data -> ImageError."""
    try:
        img.seek(0)  # first frame of an animation
        img.load()
        if min_side is not None and img.format not in DCT_SCALED:
            # a box reduce before the bicubic resize changes the input more than DCT scaling does
            # (docs/intake.md): keep twice the margin
            factor = min(img.size) // (REDUCE_MARGIN * min_side)
            if factor >= 2:
                img = img.reduce(factor)
        return to_rgb(ImageOps.exif_transpose(img) or img)
    except ImageError:
        raise
    except Exception as e:  # truncated or corrupt data surfaces here, whatever the decoder
        raise ImageError("invalid_image", f"the {img.format} data is corrupt or truncated: {e}") from None


def decode_image(data: bytes, limits: ImageLimits = ImageLimits(), min_side: int | None = None) -> Image.Image:
    """Untrusted bytes -> RGB image, or ImageError. `min_side`: decode no more pixels than a shorter
    side of `min_side` needs (None: every pixel)."""
    img = open_image(data, limits)
    plan_decode(img, min_side)
    return load_image(img, min_side)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency composited on white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        scale = 1.0 if mode == "F" and arr.max(initial=0) <= 1.0 else (65535.0 if arr.max(initial=0) > 255 else 255.0)
        arr = np.clip(arr / scale * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("LA", "PA", "La", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img).convert("RGB")
    return img.convert("RGB")


RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def resize_shorter_side(img: Image.Image, size: int, resample: str = "bicubic") -> Image.Image:
    """The shorter side to `size` (PIL's filter, which always antialiases: what torchvision's Resize
    does on a PIL image); `resample` is the model family's (`Limits.resample`)."""
    w, h = img.size
    if w <= h:
        new = (size, int(size * h / w))
    else:
        new = (int(size * w / h), size)
    return img if new == (w, h) else img.resize(new, RESAMPLE[resample])


def center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 (3, H, W) in [0, 1]."""
    img = img.convert("RGB")
    w, h = img.size
    hwc = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(h, w, 3)
    return hwc.permute(2, 0, 1).contiguous().float().div_(255.0)  # contiguous: hashing it later is 3x faster


def fit_to_model(img: Image.Image, size: int, resample: str = "bicubic") -> Image.Image:
    """Any PIL image -> RGB, shorter side resized to `size` (bicubic unless the family's reference
    uses another filter), centre-cropped to size x size."""
    return center_crop(resize_shorter_side(img.convert("RGB"), size, resample), size)


def preprocess(img: Image.Image, size: int, resample: str = "bicubic") -> torch.Tensor:
    """A PIL image -> the model's (3, size, size) input in [0, 1], as the reference prepares it."""
    return to_tensor(fit_to_model(img, size, resample))


def decode_side(size: int, decode_scale: float) -> int | None:
    """The shorter side to decode images at for a model input of `size` px (`ALIT_DECODE_SCALE`):
    `decode_scale` x `size`, never below `size`; 0 -> None, every pixel."""
    return None if decode_scale <= 0 else max(size, round(decode_scale * size))


def model_input(img: Image.Image, size: int, min_side: int | None = None, resample: str = "bicubic") -> torch.Tensor:
    """An image from `open_image`, planned by `plan_decode(img, min_side)` -> the model's input: decoded
    (`load_image`), then the one preprocessing. The API's intake runs it in two steps around its
    decode-memory budget; `load_for_model` in one."""
    return preprocess(load_image(img, min_side), size, resample)


def load_for_model(data: bytes, size: int, limits: ImageLimits = ImageLimits(), resample: str = "bicubic",
                   min_side: int | None = None) -> torch.Tensor:
    """Untrusted encoded bytes -> the model's input (or ImageError): what the API (with `min_side` =
    `decode_side(size, ALIT_DECODE_SCALE)`), Triton and `tokenize-dataset` run. `min_side` None: every pixel."""
    img = open_image(data, limits)
    plan_decode(img, min_side)
    return model_input(img, size, min_side, resample)


def to_png(pixels: torch.Tensor) -> bytes:
    """(3, H, W) in [0, 1] -> PNG bytes."""
    arr = (pixels.detach().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy())
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()
