"""Image decoding: every Pillow mode to RGB, EXIF orientation, bomb guard, bad files."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from core.shard_format import SampleError
from preprocessing.image import load_image
from preprocessing.settings import ImageConfig

CFG = ImageConfig(width=64, height=32)


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def solid(mode: str, value, size=(80, 40)) -> Image.Image:
    return Image.new(mode, size, value)


@pytest.mark.parametrize(
    "img, fmt, rgb",
    [
        (solid("RGB", (200, 100, 50)), "PNG", (200, 100, 50)),
        (solid("L", 77), "PNG", (77, 77, 77)),
        (solid("1", 1), "PNG", (255, 255, 255)),
        (solid("LA", (77, 255)), "PNG", (77, 77, 77)),
        (solid("RGBA", (10, 20, 30, 255)), "PNG", (10, 20, 30)),
        (solid("RGBA", (0, 0, 0, 0)), "PNG", (255, 255, 255)),  # transparent -> white background
        (solid("RGB", (0, 255, 0)).convert("P"), "PNG", (0, 255, 0)),
        (solid("CMYK", (0, 255, 255, 0)), "JPEG", (255, 0, 0)),  # cyan 0, magenta+yellow full = red
        (solid("CMYK", (0, 0, 0, 0)), "TIFF", (255, 255, 255)),
        (Image.fromarray(np.full((40, 80), 40000, np.uint16)), "PNG", (155, 155, 155)),  # 16-bit grey
        (solid("I", 65535), "TIFF", (255, 255, 255)),
        (solid("F", 0.5), "TIFF", (128, 128, 128)),
    ],
    ids=["rgb", "grey", "bilevel", "grey_alpha", "rgba", "transparent", "palette", "cmyk_jpeg", "cmyk_tiff",
         "16bit", "int32", "float"],
)
def test_any_mode_becomes_rgb(img, fmt, rgb):
    pixels, meta = load_image("mem://x", encode(img, fmt), CFG)
    assert pixels.dtype == np.uint8 and pixels.shape == (32, 64, 3)
    np.testing.assert_allclose(pixels.reshape(-1, 3).mean(0), rgb, atol=3)
    assert meta["image_mode"] == img.mode and meta["original_size"] == [80, 40]


def test_16bit_keeps_its_dynamic_range():
    ramp = (np.linspace(0, 65535, 80)[None, :].repeat(40, 0)).astype(np.uint16)
    pixels, _ = load_image("ramp.png", encode(Image.fromarray(ramp)), CFG)
    row = pixels[16, :, 0].astype(int)
    assert row[0] < 10 and row[-1] > 245 and np.all(np.diff(row) >= 0)  # not clipped to white


def _marker() -> Image.Image:
    """80x40 black image with a red block in the top-left corner."""
    arr = np.zeros((40, 80, 3), np.uint8)
    arr[:10, :20] = (255, 0, 0)
    return Image.fromarray(arr)


def test_exif_orientation_is_applied():
    # Store the picture rotated 90° and tag it "display rotated 90° CW" (orientation 6):
    # after exif_transpose the red marker must be top-left again and the image landscape.
    stored = _marker().transpose(Image.Transpose.ROTATE_90)  # 40x80, marker now bottom-left
    exif = Image.Exif()
    exif[0x0112] = 6
    pixels, meta = load_image("rot.jpg", encode(stored, "JPEG", exif=exif, quality=95), ImageConfig(80, 40))
    assert meta["original_size"] == [80, 40]
    red = (pixels[..., 0] > 128) & (pixels[..., 1] < 100)
    ys, xs = np.nonzero(red)
    assert ys.mean() < 10 and xs.mean() < 20


def test_pixel_limit_is_per_config():
    data = encode(solid("RGB", (1, 2, 3), size=(3000, 2000)))
    with pytest.raises(SampleError) as err:
        load_image("big.png", data, ImageConfig(width=64, height=32, max_pixels=1_000_000))
    assert err.value.reason == "image_bomb" and "big.png" in err.value.detail
    assert "image.max_pixels" in err.value.detail
    pixels, _ = load_image("big.png", data, ImageConfig(width=64, height=32, max_pixels=10_000_000))
    assert pixels.shape == (32, 64, 3)


def test_decompression_bomb_header(synthetic):
    bomb = synthetic["root"] / "bad" / "bomb.png"
    with pytest.raises(SampleError) as err:
        load_image(str(bomb), bomb.read_bytes(), CFG)
    assert err.value.reason == "image_bomb" and str(bomb) in err.value.detail


@pytest.mark.parametrize(
    "data, what",
    [(b"GIF89a-not-really", "gif"), (b"\x89PNG\r\n\x1a\n" + b"\0" * 30, "png"), (b"hello world", "text")],
)
def test_garbage_is_bad_image(data, what):
    with pytest.raises(SampleError) as err:
        load_image(f"file.{what}", data, CFG)
    assert err.value.reason == "bad_image" and f"file.{what}" in err.value.detail


def test_truncated_jpeg_is_bad_image():
    data = encode(_marker(), "JPEG", quality=90)
    with pytest.raises(SampleError) as err:
        load_image("cut.jpg", data[: len(data) // 2], CFG)
    assert err.value.reason == "bad_image" and "cut.jpg" in err.value.detail
