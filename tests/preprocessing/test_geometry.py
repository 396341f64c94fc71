"""Frame selection (docs/method.md#prep) and resize-to-cover + centre-crop geometry."""

from __future__ import annotations

import numpy as np
import pytest

from core.geometry import TooShort, base_stride, cover_crop, select_frames
from core.shard_format import sample_key
from preprocessing.transform import apply_crop

KEYS = [sample_key(f"s3://bucket/video{i}.mp4") for i in range(25)]


@pytest.mark.parametrize("fps", [2, 5, 7.5, 8, 12, 15, 23.976, 24, 25, 29.97, 30, 48, 50, 59.94, 60, 90, 120])
@pytest.mark.parametrize("frames", [8, 32])
def test_stride_and_indices_for_native_fps(fps, frames):
    target = 8.0
    expected_stride = max(1, round(fps / target))
    n_frames = int(fps * 20)  # 20 s: long enough for the full stride
    if n_frames < frames:
        n_frames = frames * 3
    for key in KEYS:
        indices, stride = select_frames(n_frames, fps, target, frames, key)
        assert stride == expected_stride
        assert len(indices) == frames
        assert np.all(np.diff(indices) == stride)  # evenly spaced at the stride, no padding
        assert 0 <= indices[0] and indices[-1] < n_frames
        # the start is a pure function of the key: reruns pick the same frames
        assert (indices, stride) == select_frames(n_frames, fps, target, frames, key)


def test_start_depends_on_key_and_covers_the_video():
    starts = {select_frames(300, 24, 8, 8, k)[0][0] for k in KEYS}
    assert len(starts) > 10  # different videos start at different places
    assert all(0 <= s <= 300 - (3 * 7 + 1) for s in starts)


@pytest.mark.parametrize("n_frames", [8, 9, 15, 21, 22, 40])
def test_short_videos_lower_the_stride(n_frames):
    # 24 fps -> stride 3 needs 3*7+1 = 22 frames for F=8; shorter videos get the largest stride that fits
    indices, stride = select_frames(n_frames, 24.0, 8.0, 8, KEYS[0])
    assert stride == min(3, (n_frames - 1) // 7)
    assert stride >= 1
    assert indices[-1] < n_frames and len(set(indices)) == 8


@pytest.mark.parametrize("n_frames", [0, 1, 7])
def test_too_short_never_pads(n_frames):
    with pytest.raises(TooShort, match=f"has {n_frames} frame"):
        select_frames(n_frames, 30.0, 8.0, 8, KEYS[1])


def test_exactly_f_frames_uses_all_of_them():
    assert select_frames(8, 120.0, 8.0, 8, KEYS[2]) == (list(range(8)), 1)


@pytest.mark.parametrize("fps", [0.0, -5.0, float("nan"), float("inf")])
def test_unknown_fps_falls_back_to_stride_one(fps):
    assert base_stride(fps, 8.0) == 1


@pytest.mark.parametrize(
    "src, target",
    [
        ((640, 360), (448, 256)),  # 16:9 landscape
        ((360, 640), (448, 256)),  # portrait phone video
        ((2560, 480), (448, 256)),  # ultra-wide
        ((100, 2000), (128, 64)),  # ultra-tall
        ((17, 9), (448, 256)),  # tiny: upscaled
        ((1, 1), (128, 64)),
        ((641, 359), (448, 256)),  # odd sizes
        ((449, 257), (448, 256)),
        ((448, 256), (448, 256)),
    ],
)
def test_cover_crop_geometry(src, target):
    crop = cover_crop(*src, *target)
    x0, y0, x1, y1 = crop.box
    bw, bh = x1 - x0, y1 - y0
    assert 0 <= x0 and 0 <= y0 and x1 <= src[0] and y1 <= src[1]
    # the box spans the whole source along one axis (resize-to-cover) ...
    assert bw == src[0] or bh == src[1]
    # ... has the target's aspect ratio up to half a source pixel of rounding per side ...
    assert abs(bw * target[1] - bh * target[0]) <= (target[0] + target[1]) / 2
    # ... and is centred (off by at most half a pixel of integer division)
    assert abs((src[0] - x1) - x0) <= 1 and abs((src[1] - y1) - y0) <= 1
    pixels = np.random.default_rng(0).integers(0, 256, (2, src[1], src[0], 3), dtype=np.uint8)
    assert apply_crop(pixels, crop).shape == (2, target[1], target[0], 3)


def test_crop_keeps_the_centre_and_drops_the_sides():
    # 640x360 frame: left/right 10% red, middle green -> after cover-crop to 256x256 only green remains
    frame = np.zeros((1, 360, 640, 3), np.uint8)
    frame[..., 1] = 200
    frame[:, :, :64] = (255, 0, 0)
    frame[:, :, -64:] = (255, 0, 0)
    out = apply_crop(frame, cover_crop(640, 360, 256, 256))
    assert out.shape == (1, 256, 256, 3)
    assert out[..., 0].max() == 0 and out[..., 1].min() == 200


def test_portrait_crop_keeps_the_vertical_centre():
    frame = np.zeros((1, 640, 360, 3), np.uint8)
    frame[:, 300:340] = 255  # a white band across the middle
    out = apply_crop(frame, cover_crop(360, 640, 448, 256))
    rows = out[0, :, :, 0].mean(axis=1)
    assert rows[len(rows) // 2] > 200 and rows[0] < 5 and rows[-1] < 5
