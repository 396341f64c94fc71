"""Image decoding with Pillow: any mode to RGB, EXIF orientation, decompression-bomb limit,
then the same resize-to-cover + centre crop as video frames (docs/method.md#prep, `transform.py`)."""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from core.geometry import cover_crop
from core.shard_format import SampleError
from preprocessing.filters import source_failure
from preprocessing.settings import ImageConfig
from preprocessing.transform import resize_cover


def allow_up_to(max_pixels: int) -> None:
    """Raise Pillow's process-wide bomb limit to ours: `load_image` enforces `max_pixels` itself
    per call, so Pillow's global (2× its default for a hard error) must not refuse first."""
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB of any Pillow mode. Alpha is composited on white; 16/32-bit and float are rescaled
    (Pillow's own convert clips 16-bit values to 255, which turns photos white)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(img).astype(np.float64)
        if mode == "F":
            top = 1.0 if arr.size and np.nanmax(arr) <= 1.0 else 255.0
        elif mode == "I" and arr.size and arr.max() <= 255:
            top = 255.0
        else:
            top = 65535.0
        arr = np.clip(np.nan_to_num(arr) / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "P" or mode == "PA":
        img = img.convert("RGBA")
    elif mode == "LA" or mode == "La":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "RGBa"):
        if img.mode == "RGBa":
            img = img.convert("RGBA")
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img, mask=img.getchannel("A"))
        return background
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def resize_cover_crop(img: Image.Image, width: int, height: int) -> tuple[np.ndarray, dict[str, Any]]:
    """uint8 [H,W,3] after resize-to-cover + centre crop (the video transform); geometry."""
    crop = cover_crop(img.width, img.height, width, height)
    box = np.asarray(img.crop(crop.box), dtype=np.uint8)
    return np.ascontiguousarray(resize_cover(box[None], width, height)[0]), crop.meta()


def load_image(source: str, data: bytes, cfg: ImageConfig,
               limits: dict[str, float] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode, orient, convert and crop one image; raises SampleError naming `source`.
    `limits`: the size filters (`FilterConfig.source_request()`), checked on the header."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            pixels = img.width * img.height
            if pixels > cfg.max_pixels:
                raise SampleError(
                    "image_bomb",
                    f"{source}: {img.width}x{img.height} = {pixels} pixels exceeds image.max_pixels="
                    f"{cfg.max_pixels} (decompression-bomb guard; raise it if the file is legitimate)",
                )
            if (failure := source_failure(limits, img.width, img.height)) is not None:
                raise SampleError(failure[0], f"{source}: {failure[1]}")
            fmt, mode = img.format, img.mode
            img.load()
            try:
                img = ImageOps.exif_transpose(img)
            except Exception:  # broken EXIF must not lose an otherwise good image
                pass
            rgb = to_rgb(img)
    except SampleError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise SampleError("image_bomb", f"{source}: {exc} (decompression-bomb guard; raise image.max_pixels "
                          "if the file is legitimate)") from None
    except UnidentifiedImageError:
        raise SampleError("bad_image", f"{source}: not an image Pillow can identify") from None
    except MemoryError:
        raise SampleError("out_of_memory", f"{source}: ran out of memory decoding the image") from None
    except Exception as exc:  # truncated data, broken codecs: Pillow raises OSError/ValueError/...
        detail = f"{source}: cannot decode image: {type(exc).__name__}: {exc}"
        raise SampleError("bad_image", detail) from None
    pixels_out, geometry = resize_cover_crop(rgb, cfg.width, cfg.height)
    return pixels_out, {"image_format": fmt, "image_mode": mode, **geometry}
