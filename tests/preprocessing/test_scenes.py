"""Scene splitting (`preprocessing/scenes.py`): hard cuts at known times are found within one
frame at 8 fps, and the span arithmetic of `video.split` (fixed windows, max/min clip length)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from preprocessing.scenes import detect_cuts, lowres_size, scene_split, split_spans
from preprocessing.synthetic import write_video

SCENES = [(0.0, (30, 60, 150)), (2.5, (200, 40, 40)), (5.0, (20, 160, 60)), (7.25, (230, 220, 200))]
SECONDS = 9.0


def _video(path: Path, fps: int, width: int = 160, height: int = 96) -> Path:
    """Four scenes (background colour + a square gliding over it) starting at SCENES' times."""
    n = round(SECONDS * fps)
    frames = np.empty((n, height, width, 3), np.uint8)
    for i in range(n):
        t = i / fps
        scene = max(k for k, (start, _) in enumerate(SCENES) if t >= start - 1e-9)
        frames[i] = SCENES[scene][1]
        x = int(10 + 20 * t) % (width - 20)  # motion inside a scene must not count as a cut
        frames[i, 30:50, x : x + 20] = (255 - np.array(SCENES[scene][1])) // 2
    write_video(path, frames, "libx264", Fraction(fps))
    return path


@pytest.fixture(scope="module")
def cut_videos(tmp_path_factory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("scenes")
    return {fps: _video(root / f"cuts_{fps}.mp4", fps) for fps in (8, 24)}


@pytest.mark.parametrize("fps", [8, 24])
def test_hard_cuts_detected_within_one_frame_at_8fps(cut_videos, fps):
    split = scene_split(str(cut_videos[fps]), "scenes")
    starts = [start for start, _ in split.spans]
    assert len(starts) == len(SCENES)
    for got, (want, _) in zip(starts, SCENES):
        assert abs(got - want) <= 1 / 8 + 1e-6
    assert split.spans[-1][1] == pytest.approx(SECONDS)
    assert all(a[1] == b[0] for a, b in zip(split.spans, split.spans[1:]))  # contiguous
    assert split.short == []


def test_detection_is_deterministic_and_max_clip_cuts_long_scenes(cut_videos):
    once = scene_split(str(cut_videos[8]), "scenes", max_clip_s=1.5, min_clip_s=1.0)
    again = scene_split(str(cut_videos[8]), "scenes", max_clip_s=1.5, min_clip_s=1.0)
    assert once == again
    assert all(end - start <= 1.5 + 1e-9 for start, end in once.spans)
    # scene 1 (2.5 s) -> 1.5 + 1.0; scene 3 (2.25 s) -> 1.5 + 0.75 and scene 4 (1.75 s) ->
    # 1.5 + 0.25: the pieces under min_clip_s are returned as short, not dropped
    assert once.spans[:2] == [(0.0, 1.5), (1.5, 2.5)]
    assert once.short == [(6.5, 7.25), (8.75, 9.0)]
    total = sum(end - start for start, end in once.spans + once.short)
    assert total == pytest.approx(SECONDS)


def test_no_cut_in_a_single_scene(tmp_path):
    path = tmp_path / "one.mp4"
    frames = np.full((24, 64, 96, 3), (50, 120, 90), np.uint8)
    for i in range(24):
        frames[i, 20:40, 2 * i : 2 * i + 20] = 250
    write_video(path, frames, "libx264", Fraction(8))
    assert scene_split(str(path), "scenes").spans == [(0.0, 3.0)]


def test_detect_cuts_on_arrays():
    frames = [np.full((16, 16, 3), 20 if i < 5 else 220, np.uint8) for i in range(10)]
    assert detect_cuts(frames, 8.0) == [5]
    assert detect_cuts([], 8.0) == []


def test_fixed_windows_and_limits():
    split = split_spans(80, 8.0, "fixed", clip_seconds=4.0)  # 10 s
    assert split.spans == [(0.0, 4.0), (4.0, 8.0), (8.0, 10.0)]
    split = split_spans(80, 8.0, "fixed", clip_seconds=4.0, min_clip_s=3.0)
    assert split.spans == [(0.0, 4.0), (4.0, 8.0)] and split.short == [(8.0, 10.0)]
    assert split_spans(80, 8.0, "none").spans == [(0.0, 10.0)]
    assert split_spans(80, 8.0, "none", max_clip_s=6.0).spans == [(0.0, 6.0), (6.0, 10.0)]
    assert split_spans(80, 8.0, "scenes", cuts=[20, 60]).spans == [(0.0, 2.5), (2.5, 7.5), (7.5, 10.0)]
    assert split_spans(0, 8.0, "fixed").spans == []
    with pytest.raises(ValueError, match="video.split"):
        split_spans(80, 8.0, "shots")


def test_lowres_size():
    assert lowres_size(1920, 1080) == (170, 96)
    assert lowres_size(64, 48) == (64, 48)  # never upscaled


def test_scanner_child_splits_and_fails_bad_files(cut_videos, tmp_path):
    from core.shard_format import SampleError
    from preprocessing.scenes import SceneScanner
    from preprocessing.settings import VideoConfig

    scanner = SceneScanner(VideoConfig(split="scenes", max_clip_s=3.0))
    try:
        split = scanner.split(str(cut_videos[8]), cut_videos[8].read_bytes())  # from bytes
        assert [round(s * 8) for s, _ in split.spans] == [0, 20, 40, 58]
        assert split.cuts == [20, 40, 58]
        bad = tmp_path / "bad.mp4"
        bad.write_bytes(b"\x00garbage" * 100)
        with pytest.raises(SampleError) as err:
            scanner.split(str(bad))
        assert err.value.reason == "decode_error" and str(bad) in err.value.detail
        fixed = SceneScanner(VideoConfig(split="fixed", clip_seconds=4.0))
        assert fixed.split(str(cut_videos[24])).spans == [(0.0, 4.0), (4.0, 8.0), (8.0, 9.0)]
        fixed.close()
    finally:
        scanner.close()
