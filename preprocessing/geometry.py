"""Pure frame-selection and crop geometry (SPEC §2). No I/O: the decoder child imports this.

Kept free of torch/decord so it is cheap to import in the isolated decoder process and easy
to test exhaustively.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


class TooShort(ValueError):
    """The video has fewer frames than one clip needs, even at stride 1."""


def base_stride(native_fps: float, target_fps: float) -> int:
    """stride = max(1, round(native_fps / target_fps)); unknown/invalid fps -> 1."""
    if not (isinstance(native_fps, (int, float)) and math.isfinite(native_fps) and native_fps > 0):
        return 1
    return max(1, round(native_fps / target_fps))


def select_frames(
    n_frames: int, native_fps: float, target_fps: float, frames: int, key: str
) -> tuple[list[int], int]:
    """(frame indices, stride) of the one clip taken from a video (SPEC §2).

    The stride is lowered (down to 1) until the clip fits; never pads. The start is derived
    from the hex sample key so reruns pick the same frames.
    """
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    if n_frames < frames:
        raise TooShort(f"has {n_frames} frame(s), a clip needs {frames} even at stride 1")
    stride = base_stride(native_fps, target_fps)
    if frames > 1:
        stride = min(stride, (n_frames - 1) // (frames - 1))
    span = stride * (frames - 1) + 1
    start = int(key, 16) % (n_frames - span + 1)
    return [start + stride * i for i in range(frames)], stride


@dataclass(frozen=True)
class Crop:
    """Resize (w,h) to cover (W,H) keeping aspect, then centre-crop to W×H."""

    src_w: int
    src_h: int
    resized_w: int
    resized_h: int
    left: int  # crop offset in the resized frame
    top: int
    width: int
    height: int

    def box_in_source(self) -> list[float]:
        """[x0, y0, x1, y1] of the crop in original pixel coordinates (for KEY.json)."""
        sx, sy = self.src_w / self.resized_w, self.src_h / self.resized_h
        return [
            round(self.left * sx, 2),
            round(self.top * sy, 2),
            round((self.left + self.width) * sx, 2),
            round((self.top + self.height) * sy, 2),
        ]

    def meta(self) -> dict:
        return {
            "original_size": [self.src_w, self.src_h],
            "resized_size": [self.resized_w, self.resized_h],
            "crop_box": self.box_in_source(),
        }


def cover_crop(src_w: int, src_h: int, width: int, height: int) -> Crop:
    """Geometry of resize-to-cover + centre crop. The resized frame is never smaller than W×H."""
    if min(src_w, src_h, width, height) < 1:
        raise ValueError(f"sizes must be positive, got source {src_w}x{src_h}, target {width}x{height}")
    scale = max(width / src_w, height / src_h)
    rw = max(width, round(src_w * scale))
    rh = max(height, round(src_h * scale))
    return Crop(src_w, src_h, rw, rh, (rw - width) // 2, (rh - height) // 2, width, height)


def crop_array(pixels: np.ndarray, crop: Crop) -> np.ndarray:
    """Centre-crop an already resized [..., rh, rw, 3] array."""
    if pixels.shape[-3:-1] != (crop.resized_h, crop.resized_w):
        raise ValueError(
            f"expected frames of {crop.resized_w}x{crop.resized_h}, got {pixels.shape[-2]}x{pixels.shape[-3]}"
        )
    sl = pixels[..., crop.top : crop.top + crop.height, crop.left : crop.left + crop.width, :]
    return np.ascontiguousarray(sl)
