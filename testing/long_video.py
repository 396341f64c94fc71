"""Long test videos that are cheap to make: flat grey frames whose shades encode the frame
index, so a test can tell which source frame it got back (`frame_number`).

Frame i has its left half at grey 4 * (i % 64) and its right half at grey 4 * ((i // 64) % 64)
(written straight as YUV 4:2:0, no colour conversion): x264 codes such a frame in a few bytes,
ten minutes of 640x360 take seconds, and the shades survive compression within 2 levels.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np


def _luma(grey: int) -> int:
    return int(round(16 + grey * 219 / 255))  # limited-range Y of an RGB grey


def frame_number(frame: np.ndarray) -> int:
    """The index a decoded frame (uint8 [H, W, 3], any size) was made from (modulo 4096)."""
    w = frame.shape[1]
    low, high = (int(round(float(frame[:, a:b].mean()) / 4)) for a, b in ((0, w // 4), (3 * w // 4, w)))
    return low % 64 + 64 * (high % 64)


def write_long_video(path: str | Path, seconds: float, fps: int = 24, size: tuple[int, int] = (64, 48),
                     keyint: int = 48) -> int:
    """Write an h264 mp4 of `seconds` at `fps` (width x height `size`); returns its frame count.
    `keyint` frames between keyframes (a seek decodes from the keyframe before the span)."""
    import av

    width, height = size
    n = int(round(seconds * fps))
    planes = np.full((height * 3 // 2, width), 128, np.uint8)  # Y rows, then U and V rows
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        stream.thread_count = 1
        stream.options = {"preset": "ultrafast", "crf": "18", "g": str(keyint)}
        for i in range(n):
            planes[:height, : width // 2] = _luma(4 * (i % 64))
            planes[:height, width // 2 :] = _luma(4 * ((i // 64) % 64))
            for packet in stream.encode(av.VideoFrame.from_ndarray(planes, format="yuv420p")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return n
