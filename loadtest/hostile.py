"""A generated corpus of hostile and odd inputs, each with the answer the API documents for it.

    python loadtest/hostile.py --url http://127.0.0.1:8000     # run it against a server, print a table

Nothing binary is committed: every case is built here from code (PIL, byte surgery, JSON).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import struct
import sys
import zlib
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

PHOTO_SIZE = (80, 60)


@dataclass
class Case:
    name: str
    endpoint: str  # "/v1/tokenize" or "/v1/reconstruct"
    status: int
    code: str | None  # error code expected (None for 200)
    files: dict | None = None  # multipart
    data: dict | None = None  # multipart fields
    json_body: object = None
    content: bytes | None = None  # raw body
    headers: dict = field(default_factory=dict)


def _img(mode: str = "RGB", size=PHOTO_SIZE, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    base = (np.linspace(0, 255, w)[None, :, None] + rng.integers(0, 60, (h, w, 3))).clip(0, 255).astype(np.uint8)
    return Image.fromarray(base, "RGB").convert(mode) if mode != "RGB" else Image.fromarray(base, "RGB")


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def png_bomb(w: int, h: int) -> bytes:
    """A tiny PNG whose header declares w x h pixels (grey, 8-bit): a decompression bomb's header."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024, 9)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def gif_huge_screen() -> bytes:
    g = bytearray(_save(_img("P", (8, 8)), "GIF"))
    g[6:10] = struct.pack("<HH", 65535, 65535)  # logical screen
    i = g.index(b"\x2c")  # image descriptor: its size too
    g[i + 5:i + 9] = struct.pack("<HH", 65535, 65535)
    return bytes(g)


def jpeg_huge_sof() -> bytes:
    j = bytearray(_save(_img(), "JPEG"))
    i = j.index(b"\xff\xc0")
    j[i + 5:i + 9] = struct.pack(">HH", 60000, 60000)
    return bytes(j)


def bmp_huge() -> bytes:
    b = bytearray(_save(_img(size=(4, 4)), "BMP"))
    b[18:26] = struct.pack("<ii", 100000, 100000)
    return bytes(b)


def exif_rotated_jpeg() -> bytes:
    img = _img()
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    return _save(img, "JPEG", exif=exif)


def animated_gif() -> bytes:
    frames = [_img("P", seed=s) for s in range(3)]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def palette_with_transparency() -> bytes:
    p = _img("P")
    return _save(p, "PNG", transparency=0)


def corrupt_png_crc() -> bytes:
    p = bytearray(_save(_img(), "PNG"))
    i = p.index(b"IDAT") + 10
    p[i:i + 16] = bytes(16)  # damaged compressed data
    return bytes(p)


def sixteen_bit() -> bytes:
    arr = (np.linspace(0, 65535, 80 * 60).reshape(60, 80)).astype(np.uint16)
    return _save(Image.fromarray(arr), "PNG")  # uint16 -> mode I;16


def float_tiff() -> bytes:
    return _save(Image.fromarray(np.random.default_rng(1).random((60, 80)).astype(np.float32), "F"), "TIFF")


def cases() -> list[Case]:
    photo = _save(_img(), "PNG")
    jpeg = _save(_img(), "JPEG")
    webp = _save(_img(), "WEBP")
    gif = _save(_img("P"), "GIF")
    tok = "/v1/tokenize"

    def mp(name, data: bytes, status, code, fields=None, filename="img.png", ctype="image/png"):
        return Case(name, tok, status, code, files={"file": (filename, data, ctype)}, data=fields or {})

    def js(name, body, status, code):
        return Case(name, tok, status, code, json_body=body)

    def rc(name, body, status, code):
        return Case("reconstruct: " + name, "/v1/reconstruct", status, code, json_body=body)

    b64 = lambda d: base64.b64encode(d).decode()  # noqa: E731
    out = [
        # --- not images / broken images ---
        mp("zero bytes", b"", 422, "empty_image"),
        mp("text posing as PNG", b"hello, I am definitely a PNG", 415, "unsupported_image"),
        mp("HTML posing as image", b"<html><body><img src=x onerror=alert(1)></body></html>", 415, "unsupported_image"),
        mp("SVG", b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', 415, "unsupported_image"),
        mp("PDF", b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", 415, "unsupported_image"),
        mp("ZIP", b"PK\x03\x04" + bytes(40), 415, "unsupported_image"),
        mp("ICO (not a supported format)", _save(_img(size=(32, 32)), "ICO"), 415, "unsupported_image"),
        mp("PNG signature only", b"\x89PNG\r\n\x1a\n", 415, "unsupported_image"),
        mp("truncated PNG", photo[: len(photo) // 2], 422, "invalid_image"),
        mp("PNG with damaged IDAT", corrupt_png_crc(), 422, "invalid_image"),
        mp("truncated JPEG", jpeg[: len(jpeg) // 2], 422, "invalid_image"),
        mp("JPEG header only", jpeg[:20], 415, "unsupported_image"),
        mp("truncated WebP", webp[: len(webp) // 2], 422, "invalid_image"),
        mp("truncated GIF", gif[: len(gif) // 2], 422, "invalid_image"),
        mp("GIF header only", b"GIF89a", 415, "unsupported_image"),
        mp("polyglot GIF/JavaScript", b"GIF89a/*\x00\x00*/=alert(1);//" + bytes(20), 415, "unsupported_image"),
        # --- too large ---
        mp("decompression bomb PNG (60000x60000)", png_bomb(60000, 60000), 413, "image_too_large"),
        mp("PNG declaring 100000x1", png_bomb(100000, 1), 413, "image_too_large"),
        mp("GIF declaring 65535x65535", gif_huge_screen(), 413, "image_too_large"),
        mp("JPEG declaring 60000x60000", jpeg_huge_sof(), 413, "image_too_large"),
        mp("BMP declaring 100000x100000", bmp_huge(), 413, "image_too_large"),
        mp("image over the byte limit (20 MiB)", b"\x89PNG\r\n\x1a\n" + bytes(21_000_000), 413, "image_too_large"),
        # --- odd but valid images: served ---
        mp("1x1 PNG", _save(_img(size=(1, 1)), "PNG"), 200, None),
        mp("2x60 (aspect 30:1)", _save(_img(size=(2, 60)), "PNG"), 200, None),
        mp("1x200 (aspect 200:1)", _save(_img(size=(1, 200)), "PNG"), 422, "invalid_image"),
        mp("3000x40 (aspect 75:1)", _save(_img(size=(3000, 40)), "PNG"), 422, "invalid_image"),
        mp("16-bit grayscale PNG", sixteen_bit(), 200, None),
        mp("CMYK JPEG", _save(_img("CMYK"), "JPEG"), 200, None, filename="a.jpg", ctype="image/jpeg"),
        mp("palette PNG with transparency", palette_with_transparency(), 200, None),
        mp("RGBA PNG", _save(_img("RGBA"), "PNG"), 200, None),
        mp("LA PNG", _save(_img("LA"), "PNG"), 200, None),
        mp("grayscale PNG", _save(_img("L"), "PNG"), 200, None),
        mp("1-bit PNG", _save(_img("1"), "PNG"), 200, None),
        mp("float TIFF", float_tiff(), 200, None),
        mp("animated GIF", animated_gif(), 200, None),
        mp("EXIF-rotated JPEG", exif_rotated_jpeg(), 200, None),
        mp("WebP", webp, 200, None),
        mp("BMP", _save(_img(), "BMP"), 200, None),
        mp("TIFF", _save(_img(), "TIFF"), 200, None),
        mp("PNG + trailing ZIP (polyglot)", photo + b"PK\x03\x04" + bytes(100), 200, None),
        mp("wrong part content-type (text/plain)", photo, 200, None, ctype="text/plain"),
        # --- request shape ---
        Case("body text/plain", tok, 415, "unsupported_media_type", content=b"hello", headers={"content-type": "text/plain"}),
        Case("multipart without boundary", tok, 422, "invalid_request", content=b"--x\r\n",
             headers={"content-type": "multipart/form-data"}),
        Case("multipart without file", tok, 422, "invalid_request", files={"other": ("a", b"x")}, data={}),
        Case("multipart with two files", tok, 422, "invalid_request",
             files=[("file", ("a.png", photo, "image/png")), ("file", ("b.png", photo, "image/png"))], data={}),
        mp("unknown form field", photo, 422, "invalid_request", {"quality": "9"}),
        mp("stream not a boolean", photo, 422, "invalid_request", {"stream": "maybe"}),
        js("JSON: invalid base64", {"images": [{"image": "@@not base64@@"}]}, 422, "invalid_base64"),
        js("JSON: base64 of text", {"images": [{"image": b64(b"just text")}]}, 415, "unsupported_image"),
        js("JSON: empty images", {"images": []}, 422, "invalid_request"),
        js("JSON: images not a list", {"images": "x"}, 422, "invalid_request"),
        js("JSON: image missing", {"images": [{"target": {"tokens": 32}}]}, 422, "invalid_request"),
        js("JSON: unknown top-level field", {"images": [{"image": b64(photo)}], "colour": 1}, 422, "invalid_request"),
        js("JSON: a list, not an object", [1, 2, 3], 422, "invalid_request"),
        js("JSON: too many images", {"images": [{"image": b64(photo)}] * 17}, 413, "too_many_images"),
        Case("JSON: malformed", tok, 422, "invalid_request", content=b'{"images": [', headers={"content-type": "application/json"}),
        Case("body over the limit (declared)", tok, 413, "body_too_large", content=b"x" * 70_000_000,
             headers={"content-type": "application/json"}),
        # --- targets ---
        mp("max_l1 = 0", photo, 422, "invalid_target", {"max_l1": "0"}),
        mp("max_l1 < 0", photo, 422, "invalid_target", {"max_l1": "-0.1"}),
        mp("max_l1 > 1", photo, 422, "invalid_target", {"max_l1": "2"}),
        mp("max_l1 not a number", photo, 422, "invalid_target", {"max_l1": "abc"}),
        mp("max_l1 NaN", photo, 422, "invalid_target", {"max_l1": "nan"}),
        mp("max_l1 inf", photo, 422, "invalid_target", {"max_l1": "inf"}),
        mp("min_psnr = 0", photo, 422, "invalid_target", {"min_psnr": "0"}),
        mp("min_psnr 1000", photo, 422, "invalid_target", {"min_psnr": "1000"}),
        mp("tokens 0", photo, 422, "invalid_target", {"tokens": "0"}),
        mp("tokens 33", photo, 422, "invalid_target", {"tokens": "33"}),
        mp("tokens 288 (> max)", photo, 422, "invalid_target", {"tokens": "288"}),
        mp("tokens 1.5", photo, 422, "invalid_target", {"tokens": "1.5"}),
        mp("tokens with max_l1", photo, 422, "invalid_target", {"tokens": "64", "max_l1": "0.1"}),
        mp("tokens with max_tokens", photo, 422, "invalid_target", {"tokens": "64", "max_tokens": "128"}),
        mp("max_tokens 40", photo, 422, "invalid_target", {"max_tokens": "40"}),
        js("JSON: unknown target field", {"images": [{"image": b64(photo), "target": {"psnr": 30}}]}, 422, "invalid_request"),
        js("JSON: tokens true", {"images": [{"image": b64(photo), "target": {"tokens": True}}]}, 422, "invalid_target"),
        js("JSON: max_l1 string", {"images": [{"image": b64(photo), "target": {"max_l1": "x"}}]}, 422, "invalid_request"),
        Case("X-Request-Timeout not a number", tok, 422, "invalid_request", files={"file": ("a.png", photo)}, data={},
             headers={"X-Request-Timeout": "soon"}),
        Case("X-Request-Timeout negative", tok, 422, "invalid_request", files={"file": ("a.png", photo)}, data={},
             headers={"X-Request-Timeout": "-5"}),
        # --- token ids ---
        rc("empty", {"token_ids": []}, 422, "invalid_tokens"),
        rc("31 ids", {"token_ids": [1] * 31}, 422, "invalid_tokens"),
        rc("33 ids", {"token_ids": [1] * 33}, 422, "invalid_tokens"),
        rc("288 ids (too long)", {"token_ids": [1] * 288}, 422, "invalid_tokens"),
        rc("id out of range", {"token_ids": [1] * 31 + [256]}, 422, "invalid_tokens"),
        rc("negative id", {"token_ids": [1] * 31 + [-1]}, 422, "invalid_tokens"),
        rc("huge id", {"token_ids": [1] * 31 + [2**62]}, 422, "invalid_tokens"),
        rc("id beyond 64 bits", {"token_ids": [1] * 31 + [2**80]}, 422, "invalid_tokens"),
        Case("reconstruct: body not UTF-8", "/v1/reconstruct", 422, "invalid_request", content=b"\xff\xfeDM\x00",
             headers={"content-type": "application/json"}),
        rc("floats", {"token_ids": [1.5] * 32}, 422, "invalid_request"),
        rc("strings", {"token_ids": ["a"] * 32}, 422, "invalid_request"),
        rc("nested three deep", {"token_ids": [[[1] * 32]]}, 422, "invalid_request"),
        rc("batch with one bad sequence", {"token_ids": [[1] * 32, [1] * 33]}, 422, "invalid_tokens"),
        rc("too many sequences", {"token_ids": [[1] * 32] * 17}, 413, "too_many_images"),
        rc("missing token_ids", {}, 422, "invalid_request"),
        rc("null", {"token_ids": None}, 422, "invalid_request"),
        rc("valid (control)", {"token_ids": [1] * 64}, 200, None),
    ]
    return out


def send(client, url: str, case: Case):
    return client.post(url + case.endpoint, files=case.files, data=case.data, json=case.json_body,
                       content=case.content, headers=case.headers, timeout=60)


def main(argv: list[str] | None = None) -> int:
    import httpx

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    a = p.parse_args(argv)
    bad = 0
    with httpx.Client() as c:
        for case in cases():
            r = send(c, a.url, case)
            code = r.json().get("error", {}).get("code") if r.status_code >= 400 else None
            ok = r.status_code == case.status and code == case.code
            bad += not ok
            print(f"{'ok ' if ok else 'BAD'} {r.status_code} {code or '':<24} {case.name}")
    print(json.dumps({"cases": len(cases()), "unexpected": bad}))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
