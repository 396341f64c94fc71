"""Pure frame-selection and crop geometry (docs/method.md#prep). No I/O: the decoder child imports this.

Kept free of torch/decord so it is cheap to import in the isolated decoder process and easy
to test exhaustively.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


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
    """(frame indices, stride) of the one clip taken from a video (docs/method.md#prep).

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
    """Resize-to-cover + centre crop, expressed as the source box that maps onto W×H.

    Cropping the source first and resizing the box straight to W×H is the same transform as
    resizing the whole frame to cover W×H and then centre-cropping (to within a pixel of
    rounding), but never resizes pixels that are thrown away.
    """

    src_w: int
    src_h: int
    left: int
    top: int
    box_w: int
    box_h: int
    width: int
    height: int

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) in source pixels."""
        return self.left, self.top, self.left + self.box_w, self.top + self.box_h

    def meta(self) -> dict:
        return {"original_size": [self.src_w, self.src_h], "crop_box": list(self.box)}


def cover_crop(src_w: int, src_h: int, width: int, height: int) -> Crop:
    """Largest centred source box with the target's aspect ratio (the part that stays visible
    after resize-to-cover), at least 1×1 source pixel."""
    if min(src_w, src_h, width, height) < 1:
        raise ValueError(f"sizes must be positive, got source {src_w}x{src_h}, target {width}x{height}")
    scale = max(width / src_w, height / src_h)  # resize factor that makes the frame cover W×H
    box_w = min(src_w, max(1, round(width / scale)))
    box_h = min(src_h, max(1, round(height / scale)))
    return Crop(src_w, src_h, (src_w - box_w) // 2, (src_h - box_h) // 2, box_w, box_h, width, height)
