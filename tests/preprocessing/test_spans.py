"""Clip spans on the decoder side: which frames a span covers, frames decoded from inside the
span only, `bad_span` / `too_short`, and one open per video when its clips come in a row
(counted by the decoder child itself, at each real reader construction)."""

from __future__ import annotations

import math

import pytest

from core.geometry import select_frames
from core.shard_format import SampleError, sample_key
from preprocessing.isolation import VideoDecoderProcess
from preprocessing.settings import VideoConfig
from preprocessing.spans import BadSpan, span_frames
from testing.long_video import frame_number, write_long_video

FPS = 24


@pytest.fixture(scope="module")
def long_video(tmp_path_factory):
    path = tmp_path_factory.mktemp("spans") / "long.mp4"
    n = write_long_video(path, 30, fps=FPS)  # 720 frames, 30 s
    return str(path), n


@pytest.fixture(scope="module")
def proc():
    p = VideoDecoderProcess(VideoConfig(frames=8, width=64, height=48))
    yield p
    p.close()


@pytest.mark.parametrize(("start", "end", "want"), [
    (0, 1, (0, 24)),
    (1.0, 3.0, (24, 48)),
    (0.99, 1.01, (24, 1)),  # only frame 24 (t = 1.0 s) lies in the span
    (29.0, 30.0, (696, 24)),
    (29.0, 30.05, (696, 24)),  # within 2 frames past the end: clamped
])
def test_span_frames(start, end, want):
    assert span_frames(720, FPS, start, end) == want


@pytest.mark.parametrize(("start", "end", "words"), [
    (5, 5, "start >= end"), (6, 5, "start >= end"), (-1, 2, "before 0"),
    (29, 30.2, "past the end"), (31, 40, "past the end"), (1.01, 1.02, "no frame"),
    (math.nan, 2, "start >= end"),
])
def test_span_frames_refuses(start, end, words):
    with pytest.raises(BadSpan, match=words):
        span_frames(720, FPS, start, end)


def test_frames_come_from_inside_each_span(long_video, proc):
    path, _ = long_video
    for start, end in [(0.0, 2.0), (3.5, 9.0), (12.0, 13.0), (25.25, 30.0)]:
        key = sample_key(path, (start, end))
        frames, meta = proc.decode(path, key, span=(start, end))
        first, count = span_frames(720, FPS, start, end)
        relative, stride = select_frames(count, FPS, 8.0, 8, key)  # SPEC section 2, inside the span
        assert meta["frame_indices"] == [first + i for i in relative] and meta["stride"] == stride
        assert all(start * FPS <= i < end * FPS for i in meta["frame_indices"])
        assert [frame_number(f) for f in frames] == meta["frame_indices"]  # the pixels agree
        assert meta["clip"] == [start, end] and meta["native_fps"] == FPS


def test_whole_video_request_is_unchanged(long_video, proc):
    path, n = long_video
    frames, meta = proc.decode(path, sample_key(path))
    assert "clip" not in meta
    assert meta["frame_indices"] == select_frames(n, FPS, 8.0, 8, sample_key(path))[0]
    assert [frame_number(f) for f in frames] == meta["frame_indices"]


def test_bad_and_short_spans_fail_with_their_codes(long_video, proc):
    path, _ = long_video
    cases = [((29.0, 45.0), "bad_span", "past the end"), ((4.0, 4.0), "bad_span", "start >= end"),
             ((10.0, 10.2), "too_short", "needs 8")]
    for span, reason, words in cases:
        with pytest.raises(SampleError) as err:
            proc.decode(path, sample_key(path, span), span=span)
        assert err.value.reason == reason and words in err.value.detail and path in err.value.detail


def test_one_open_per_video_for_its_clips(long_video, tmp_path):
    path, _ = long_video
    spans = [(1.0, 3.0), (6.0, 9.0), (29.5, 40.0), (10.0, 10.2), (14.0, 16.0), (20.0, 24.0)]
    results = {}
    for keep in (True, False):
        p = VideoDecoderProcess(VideoConfig(frames=8, width=64, height=48))
        try:
            got = []
            for j, span in enumerate(spans):
                try:
                    frames, meta = p.decode(path, sample_key(path, span), span=span,
                                            keep_open=keep and j < len(spans) - 1)
                    got.append([frame_number(f) for f in frames] == meta["frame_indices"])
                except SampleError as exc:  # the bad and short spans fail; the video stays open
                    got.append(exc.reason)
            results[keep] = (got, p.opens)
        finally:
            p.close()
    expected = [True, True, "bad_span", "too_short", True, True]
    assert results[True] == (expected, 1)  # one open, seeking to each span in order
    assert results[False] == (expected, len(spans))  # the per-clip baseline opens every time


def test_one_open_when_the_bytes_come_through_the_pipe(long_video):
    """A remote video: its bytes are sent with the first clip only and kept with the open video."""
    path, _ = long_video
    with open(path, "rb") as fh:
        data = fh.read()
    source = "https://example.invalid/long.mp4"  # never opened: the bytes are the file
    p = VideoDecoderProcess(VideoConfig(frames=8, width=64, height=48))
    try:
        spans = [(2.0, 4.0), (8.0, 12.0), (20.0, 22.0)]
        for j, span in enumerate(spans):
            frames, meta = p.decode(source, sample_key(source, span), data, span=span, keep_open=j < 2)
            assert [frame_number(f) for f in frames] == meta["frame_indices"]
        assert p.opens == 1
        frames, meta = p.decode(path, sample_key(path))  # a next video opens afresh
        assert p.opens == 2 and "clip" not in meta
    finally:
        p.close()
