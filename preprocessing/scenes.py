"""Splitting a video without spans into clips (`video.split: none | scenes | fixed`).

- `scenes`: PySceneDetect's `ContentDetector` (HSV content change between consecutive frames)
  on a low-resolution decode of the whole video (decord resizes inside ffmpeg, so a 1080p
  video costs little more than its bitstream decode). Each scene becomes a span.
- `fixed`: consecutive windows of `video.clip_seconds` from the start.

Then `video.max_clip_s` cuts a longer span into consecutive pieces of that length, and a span
(or remainder) shorter than `video.min_clip_s` is **not dropped silently**: it is returned in
`Split.short`, and the clip expansion records it as a failed clip with reason `too_short`
and its span, so every second of the video is accounted for in the status table.

Spans are seconds `(start_s, end_s)`, end exclusive, on the frame grid: a scene starting at
frame i starts at i / fps. Detection is deterministic for a given file (same frames, same
detector), and the spans a run used are in the status table (`clip_start`, `clip_end`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from preprocessing.settings import SPLITS

ANALYSIS_SHORT_SIDE = 96  # pixels: HSV content change needs little resolution
CHUNK = 32  # frames per decoder call while scanning


@dataclass
class Split:
    """The spans a video was split into, in order, and the pieces too short to be clips."""

    spans: list[tuple[float, float]] = field(default_factory=list)
    short: list[tuple[float, float]] = field(default_factory=list)
    cuts: list[int] = field(default_factory=list)  # frames where a detected scene starts (scenes)


def detect_cuts(frames: Iterable[np.ndarray], fps: float, threshold: float = 27.0) -> list[int]:
    """Frame indices where a new scene starts (never 0), by `ContentDetector` over uint8 RGB
    frames [H, W, 3] in order. `threshold`: PySceneDetect's (27 = its default)."""
    from scenedetect import ContentDetector, FrameTimecode

    detector = ContentDetector(threshold=threshold, min_scene_len=1)
    cuts: list[Any] = []
    last = None
    for i, frame in enumerate(frames):
        last = FrameTimecode(i, fps=fps)
        # ContentDetector expects BGR (OpenCV order); reversing channels keeps it honest
        cuts.extend(detector.process_frame(last, np.ascontiguousarray(frame[..., ::-1])))
    if last is not None:
        cuts.extend(detector.post_process(last))
    return sorted({int(c.frame_num) for c in cuts if int(c.frame_num) > 0})


def lowres_size(width: int, height: int, short_side: int = ANALYSIS_SHORT_SIDE) -> tuple[int, int]:
    """(w, h) with the short side scaled to `short_side` (never up), even numbers for ffmpeg."""
    scale = min(1.0, short_side / max(1, min(width, height)))
    return max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)


def lowres_frames(source: Any, threads: int = 1) -> tuple[Iterator[np.ndarray], int, float]:
    """(frames at low resolution, frame count, fps) with decord; `source` is a path or a
    file-like object. Frames are read in chunks of CHUNK, in order."""
    import decord

    probe = decord.VideoReader(source, num_threads=threads)
    n, fps = len(probe), float(probe.get_avg_fps())
    height, width = probe[0].shape[:2] if n else (0, 0)
    del probe
    if hasattr(source, "seek"):
        source.seek(0)
    w, h = lowres_size(width, height)
    reader = decord.VideoReader(source, num_threads=threads, width=w, height=h)

    def frames() -> Iterator[np.ndarray]:
        for start in range(0, n, CHUNK):
            yield from reader.get_batch(list(range(start, min(n, start + CHUNK)))).asnumpy()

    return frames(), n, fps


def windows(start: float, end: float, length: float) -> list[tuple[float, float]]:
    """Consecutive pieces of `length` seconds covering [start, end); the last may be shorter."""
    out, t = [], start
    while end - t > 1e-9:
        out.append((t, min(end, t + length)))
        t += length
    return out


def split_spans(
    n_frames: int,
    fps: float,
    mode: str,
    clip_seconds: float = 4.0,
    min_clip_s: float = 0.0,
    max_clip_s: float = 0.0,
    cuts: list[int] | None = None,
) -> Split:
    """Spans of a video of `n_frames` at `fps` for `video.split=mode` (`scenes` needs the
    detected `cuts`); `max_clip_s` / `min_clip_s` of 0 mean no limit."""
    if mode not in SPLITS:
        raise ValueError(f"video.split must be one of {', '.join(SPLITS)}, got {mode!r}")
    if not n_frames or not fps or not math.isfinite(fps) or fps <= 0:
        return Split()
    duration = n_frames / fps
    if mode == "none":
        pieces = [(0.0, duration)]
    elif mode == "fixed":
        pieces = windows(0.0, duration, clip_seconds)
    else:
        bounds = [0, *[c for c in (cuts or []) if 0 < c < n_frames], n_frames]
        pieces = [(a / fps, b / fps) for a, b in zip(bounds, bounds[1:])]
    out = Split(cuts=list(cuts or []) if mode == "scenes" else [])
    for start, end in pieces:
        for piece in windows(start, end, max_clip_s) if max_clip_s else [(start, end)]:
            piece = (round(piece[0], 6), round(piece[1], 6))
            (out.short if piece[1] - piece[0] < min_clip_s - 1e-9 else out.spans).append(piece)
    return out


def scene_split(
    source: Any,
    mode: str,
    clip_seconds: float = 4.0,
    min_clip_s: float = 0.0,
    max_clip_s: float = 0.0,
    threshold: float = 27.0,
    threads: int = 1,
) -> Split:
    """Split a video file (path or file-like) by `video.split=mode`."""
    if mode == "scenes":
        frames, n, fps = lowres_frames(source, threads)
        cuts = detect_cuts(frames, fps, threshold)
    else:
        import decord

        reader = decord.VideoReader(source, num_threads=threads)
        n, fps, cuts = len(reader), float(reader.get_avg_fps()), []
    return split_spans(n, fps, mode, clip_seconds, min_clip_s, max_clip_s, cuts)


SCAN_TIMEOUT_FACTOR = 10  # a scan reads the whole video: video.decode_timeout_s x this


class SceneScanner:
    """`split(source, data) -> Split` for `video.split` in an isolated child
    (`preprocessing.scene_child`: the decoder child's guards, its own process). Failures are
    `SampleError`s (`decode_error`, `timeout`, ...) naming the file, as for a clip decode."""

    def __init__(self, video: Any, threads: int = 1):
        from dataclasses import replace

        from preprocessing.isolation import VideoDecoderProcess

        self.video = video
        cfg = replace(video, decode_timeout_s=video.decode_timeout_s * SCAN_TIMEOUT_FACTOR)
        self._proc = VideoDecoderProcess(cfg, threads=threads, backend="decord",
                                         child_module="preprocessing.scene_child")
        self._proc.request_extra = {"split": {"mode": video.split, "threshold": video.scene_threshold}}

    def split(self, source: str, data: bytes | None = None) -> Split:
        from core.shard_format import sample_key

        meta = self._proc.probe(source, sample_key(source), data)
        v = self.video
        return split_spans(meta["num_source_frames"], meta["native_fps"], v.split, v.clip_seconds,
                           v.min_clip_s, v.max_clip_s, meta["cuts"])

    def close(self) -> None:
        self._proc.close()
