"""Clip spans on a decoded video's frame grid: which source frames a span `[start_s, end_s]`
covers (docs/method.md#prep rules are then applied inside those frames only).

Pure and light (no torch, no decord): the isolated decoder child imports it.
"""

from __future__ import annotations

import math

# A span may end this many frame durations past the last frame and is then clamped: the
# datasets' timestamps come from their own copy of a video, whose length can differ by a frame
# or two from the copy a user downloaded (re-muxing, a dropped last frame).
END_TOLERANCE_FRAMES = 2
_EPS = 1e-6  # timestamps are given to the millisecond: 1.999999 frames is 2 frames


class BadSpan(ValueError):
    """The span cannot be placed on this video: start >= end, negative, or past its end."""


def span_frames(n_frames: int, fps: float, start: float, end: float) -> tuple[int, int]:
    """(first frame, frame count) of the frames whose timestamps `i / fps` lie in [start, end).

    Raises BadSpan for start >= end, a negative start, a span ending more than
    END_TOLERANCE_FRAMES past the video's end, or a video with no usable frame rate."""
    if not (math.isfinite(start) and math.isfinite(end)) or start >= end:
        raise BadSpan(f"span [{start:g}, {end:g}] s has start >= end")
    if start < 0:
        raise BadSpan(f"span [{start:g}, {end:g}] s starts before 0")
    if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
        raise BadSpan(f"span [{start:g}, {end:g}] s: the video has no frame rate to place it by")
    duration = n_frames / fps
    if end > duration + END_TOLERANCE_FRAMES / fps + _EPS:
        raise BadSpan(
            f"span [{start:.3f}, {end:.3f}] s ends past the end of the video "
            f"({duration:.3f} s: {n_frames} frames at {fps:g} fps)"
        )
    first = max(0, math.ceil(start * fps - _EPS))
    stop = min(n_frames, math.ceil(end * fps - _EPS))
    if first >= stop:
        raise BadSpan(
            f"span [{start:.3f}, {end:.3f}] s holds no frame of the video "
            f"({duration:.3f} s: {n_frames} frames at {fps:g} fps)"
        )
    return first, stop - first
