"""One preprocessing: the service, training, evaluation and the benchmark turn an image into the
same model input, including odd aspect ratios where two rounding rules would disagree."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from conftest import FIXTURE
from PIL import Image

# (width, height): 103x68 is where round() and int() of the resized side differ (97 vs 96 at 64 px)
SIZES = [(103, 68), (68, 103), (65, 64), (64, 65), (200, 7), (31, 500), (1000, 999), (63, 63), (64, 64), (97, 130)]


def _image(size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _service(data: bytes, size: int) -> torch.Tensor:
    """What POST /v1/tokenize hands the engine (the API's intake, with the service's settings)."""
    import asyncio

    from service.api.intake import DecodeBudget, Intake
    from service.engine import Target
    from service.imaging import ImageLimits
    from service.model.alit import ALITLimits
    from service.settings import Settings

    s = Settings()
    intake = Intake(ImageLimits(max_bytes=s.max_image_bytes, max_pixels=s.max_image_pixels), size, s.decode_scale,
                    DecodeBudget(s.decode_memory_mb * 1024 * 1024))
    ((pixels, _, _),) = asyncio.run(intake.prepare([(data, {})], ALITLimits(32, 8), Target(max_l1=0.07)))
    return pixels


def _training(folder, size: int) -> torch.Tensor:
    from service.training.data import load_folder, to_tensor

    _, arr = load_folder(folder, size)
    return to_tensor(arr)


def _evaluation(folder, size: int) -> torch.Tensor:
    from service.training.evaluate import load_images

    _, x = load_images(folder, size)
    return x


def _benchmark(images: list[Image.Image], size: int) -> torch.Tensor:
    """What the benchmark (`alit-serve bench`, service/bench) feeds the engine."""
    from service.bench.workload import tensors

    return tensors([(str(i), im) for i, im in enumerate(images)], size)


@pytest.mark.parametrize("size", [64, 256])
def test_odd_aspect_images_preprocess_identically_everywhere(tmp_path, size):
    images = [_image(s, i) for i, s in enumerate(SIZES)]
    for i, im in enumerate(images):  # load_folder sorts by name: zero-padded, in SIZES order
        (tmp_path / f"{i:02d}.png").write_bytes(_png(im))
    service = torch.stack([_service(_png(im), size) for im in images])
    assert service.shape == (len(SIZES), 3, size, size)
    for name, other in (("training", _training(tmp_path, size)), ("evaluation", _evaluation(tmp_path, size)),
                        ("benchmark", _benchmark(images, size))):
        assert other.dtype == service.dtype and other.shape == service.shape, name
        for k, wh in enumerate(SIZES):
            assert torch.equal(other[k], service[k]), f"{name} differs from the service on a {wh[0]}x{wh[1]} image"


def test_103x68_is_resized_to_96x64_and_centre_cropped():
    """The rule itself, written out: shorter side to 64 with int() of the longer (96, not 97),
    bicubic, then a centre crop starting at round((96 - 64) / 2) = 16."""
    im = _image((103, 68), 0)
    expected = np.asarray(im.resize((96, 64), Image.BICUBIC))[:, 16:80]
    got = (_service(_png(im), 64).permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(got, expected)


def test_the_fixture_photos_preprocess_as_the_reference_did(expected):
    """The reference's own preprocessed inputs (the fixture's `input`), bit for bit."""
    photos = sorted((FIXTURE / "images").rglob("*.*"))
    got = torch.stack([_service(p.read_bytes(), 64) for p in photos])
    ref = torch.from_numpy(expected["input"])
    assert got.shape == ref.shape
    assert torch.equal((got * 255).round(), (ref * 255).round())
    assert torch.equal(_training(FIXTURE / "images", 64), got)
