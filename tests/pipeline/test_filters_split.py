"""`video.split` inside a real shard task (tiny models, in-process): a video with hard cuts at
known times becomes one clip per scene, spans recorded in the status table and KEY.json, short
scenes failing `too_short` with their span, reruns and --retry-failed giving the same clips."""

from __future__ import annotations

import json
import tarfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.config import load_config
from pipeline.config import PrepConfig
from pipeline.plan import ShardPlan
from pipeline.shard import ShardTask
from pipeline.splitting import recorded_spans
from preprocessing.synthetic import write_video

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "prep" / "tiny.yaml")
CUTS = [0.0, 2.5, 5.0, 7.25]  # scene starts; the video ends at 9 s
COLORS = [(30, 60, 150), (200, 40, 40), (20, 160, 60), (230, 220, 200)]


@pytest.fixture(scope="module")
def cut_video(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("split")
    frames = np.empty((72, 96, 160, 3), np.uint8)
    for i in range(72):
        scene = max(k for k, start in enumerate(CUTS) if i / 8 >= start - 1e-9)
        frames[i] = COLORS[scene]
        x = (10 + 2 * i) % 140
        frames[i, 30:50, x : x + 20] = 255
    path = root / "cuts.mp4"
    write_video(path, frames, "libx264", Fraction(8))
    return path


def _run(video: Path, out: Path, *overrides: str, retry: bool = False) -> pd.DataFrame:
    cfg = load_config(PrepConfig, TINY, list(overrides))
    plan = ShardPlan("videos", 0, 0, sources=[str(video)], captions=["a clip with scenes"],
                     roots=(str(video.parent),))
    ShardTask(cfg, str(out), "fp").run(plan, retry=retry)
    return pd.read_parquet(out / "videos" / "000000.parquet")


def _metas(out: Path) -> list[dict]:
    with tarfile.open(out / "videos" / "000000.tar") as tar:
        return [json.load(tar.extractfile(m)) for m in tar if m.name.endswith(".json")]


def test_scenes_become_clips(cut_video, tmp_path):
    table = _run(cut_video, tmp_path / "a", "video.split=scenes", "video.min_clip_s=2")
    assert list(table.row) == [0, 0, 0, 0]  # one manifest row, one status row per scene
    for got, want in zip(table.clip_start, CUTS):
        assert abs(got - want) <= 1 / 8 + 1e-6
    assert table.clip_end.iloc[-1] == pytest.approx(9.0)
    assert list(table.status) == ["ok", "ok", "ok", "failed"]
    assert table.reason.iloc[3] == "too_short" and "video.min_clip_s=2" in table.detail.iloc[3]
    assert table.key.nunique() == 4
    metas = _metas(tmp_path / "a")
    assert [m["clip"] for m in metas] == [[s, e] for s, e in zip(table.clip_start[:3], table.clip_end[:3])]
    for meta in metas:  # frames inside the scene only
        start, end = meta["clip"]
        assert all(start * 8 - 1e-6 <= i < end * 8 for i in meta["frame_indices"])
    # rerun: byte-identical; --retry-failed keeps the recorded spans and the ok clips
    again = _run(cut_video, tmp_path / "b", "video.split=scenes", "video.min_clip_s=2")
    assert (tmp_path / "a/videos/000000.tar").read_bytes() == (tmp_path / "b/videos/000000.tar").read_bytes()
    retried = _run(cut_video, tmp_path / "a", "video.split=scenes", "video.min_clip_s=2", retry=True)
    cols = ["key", "status", "reason", "clip_start", "clip_end"]
    pd.testing.assert_frame_equal(retried[cols], table[cols])
    pd.testing.assert_frame_equal(again[cols], table[cols])


def test_fixed_windows_and_max_clip(cut_video, tmp_path):
    table = _run(cut_video, tmp_path, "video.split=fixed", "video.clip_seconds=4", "video.max_clip_s=3")
    assert list(zip(table.clip_start, table.clip_end)) == [(0, 3), (3, 4), (4, 7), (7, 8), (8, 9)]
    assert list(table.status) == ["ok"] * 5


def test_missing_video_fails_the_row(tmp_path):
    table = _run(tmp_path / "nope.mp4", tmp_path / "out", "video.split=scenes")
    assert list(table.reason) == ["missing_file"]


def test_recorded_spans():
    rows = [dict(row=10, clip_start=0.0, clip_end=2.5), dict(row=10, clip_start=2.5, clip_end=4.0),
            dict(row=11, clip_start=None, clip_end=None), dict(row=12, clip_start=1.0, clip_end=float("nan"))]
    assert recorded_spans(rows, 10) == {0: [(0.0, 2.5), (2.5, 4.0)]}


def test_duration_filter_acts_on_each_clip_span_with_one_open(cut_video, tmp_path):
    from pipeline.manifest import Manifest
    from pipeline.plan import ShardPlanner

    manifest = tmp_path / "clips.parquet"
    spans = [[0.0, 1.5], [2.5, 5.0], [5.0, 5.5], [6.0, 8.0]]
    pd.DataFrame([{"video": str(cut_video), "caption": "scenes", "spans": spans}]).to_parquet(manifest)
    cfg = load_config(PrepConfig, TINY, [
        "manifest.clips_column=spans", "filter.min_duration_s=1.6", "filter.max_duration_s=2",
        f"manifest.allowed_roots=[{cut_video.parent}]",
    ])
    plan = next(ShardPlanner(Manifest(str(manifest), "videos", cfg.manifest, {}), 4).run())
    stats = ShardTask(cfg, str(tmp_path / "out"), "fp").run(plan)
    table = pd.read_parquet(tmp_path / "out" / "videos" / "000000.parquet")
    # the 9 s source is not what the range judges: each clip's own span is (a span too short
    # for F frames at all stays `too_short`, the fact that comes first)
    assert list(table.reason.fillna("ok")) == ["bad_duration", "bad_duration", "too_short", "ok"]
    assert "1.500s" in table.detail.iloc[0] and "2.500s" in table.detail.iloc[1]
    assert stats["video_opens"] == 1  # rejected clips do not cost a reopen
