"""Filters inside a real shard task (tiny models, in-process, no Ray): each `filter.*` gives its
code on a crafted video while a normal one passes; `manifest.filter` over a LAION-like parquet
gives `filtered` rows counted in the status table and the stats; `manifest.extra_columns`
land in KEY.json (`extra`) and the status table."""

from __future__ import annotations

import json
import tarfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from core.config import load_config
from pipeline.config import PrepConfig
from pipeline.manifest import Manifest
from pipeline.plan import ShardPlan, ShardPlanner
from pipeline.shard import ShardTask
from preprocessing.synthetic import write_video

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "prep" / "tiny.yaml")


def _scene(width: int, height: int, n: int, cut: int | None = None, still: bool = False) -> np.ndarray:
    """A square gliding 2 px a frame; at frame `cut` the scene changes (stripes, square jumps)."""
    stripes = ((np.indices((height, width))[1] // 8) % 2 * 255).astype(np.uint8)[..., None].repeat(3, -1)
    out = np.empty((n, height, width, 3), np.uint8)
    for i in range(n):
        after = cut is not None and i >= cut
        out[i] = stripes if after else (40, 90, 160)
        x = 8 + (0 if still else 2 * i) + (min(64, width - 40) if after else 0)
        y = height // 3 + (min(30, height // 3) if after else 0)
        out[i, max(0, y - 8) : y + 16, x : x + 24] = (250, 250, 40)
    return out


VIDEOS = {  # name: (frames, fps, expected reason)
    "normal": (_scene(128, 96, 8), 8, None),
    "still": (_scene(128, 96, 8, still=True), 8, "static"),
    "cut": (_scene(128, 96, 8, cut=4), 8, "scene_cut"),
    "small": (_scene(48, 32, 8), 8, "too_small"),
    "wide": (_scene(384, 64, 8), 8, "bad_aspect"),
    "long": (_scene(128, 96, 48), 8, "bad_duration"),  # 6 s
    "brief": (_scene(128, 96, 8), 24, "bad_duration"),  # 0.33 s
}
FILTERS = [
    "filter.min_short_side=64", "filter.max_aspect=3", "filter.min_duration_s=0.5",
    "filter.max_duration_s=4", "filter.min_motion=0.1", "filter.max_motion_jump=1.5",
]


def _status(out: Path, kind: str) -> pd.DataFrame:
    return pd.read_parquet(out / kind / "000000.parquet")


def _samples(out: Path, kind: str) -> dict[str, dict]:
    with tarfile.open(out / kind / "000000.tar") as tar:
        return {m.name.split(".")[0]: json.load(tar.extractfile(m)) for m in tar if m.name.endswith(".json")}


def test_each_video_filter_gives_its_code(tmp_path):
    root = tmp_path / "media"
    root.mkdir()
    sources = []
    for name, (frames, fps, _) in VIDEOS.items():
        path = root / f"{name}.mp4"
        write_video(path, frames, "libx264", Fraction(fps))
        sources.append(str(path))
    cfg = load_config(PrepConfig, TINY, [*FILTERS, "samples_per_shard=16"])
    plan = ShardPlan("videos", 0, 0, sources=sources, captions=[f"a {n} clip" for n in VIDEOS],
                     roots=(str(root),))
    stats = ShardTask(cfg, str(tmp_path / "out"), "fp").run(plan)
    table = _status(tmp_path / "out", "videos")
    got = dict(zip(table.source.map(lambda s: Path(s).stem), table.reason.replace({np.nan: None})))
    assert got == {name: expected for name, (_, _, expected) in VIDEOS.items()}
    assert stats["ok"] == 1 and stats["failed"] == len(VIDEOS) - 1
    expected = {"bad_aspect": 1, "bad_duration": 2, "scene_cut": 1, "static": 1, "too_small": 1}
    assert stats["reasons"] == expected
    assert table.detail[table.reason == "scene_cut"].str.contains("frame pair 3->4").all()
    rejected = table[table.reason.isin(["static", "scene_cut"])]
    assert rejected.motion_mean.notna().all()  # the factors that decided it are kept
    assert rejected.motion_mean[table.reason == "static"].iloc[0] < 0.1


def _laion(tmp_path: Path) -> Path:
    rows = []
    values = [(0.1, 512, 0.31), (0.9, 512, 0.30), (0.1, 128, 0.33), (0.2, 300, 0.2), (0.05, 640, 0.4)]
    for i, (punsafe, width, sim) in enumerate(values):
        Image.new("RGB", (160, 100), (30 * i, 80, 200)).save(tmp_path / f"img{i}.png")
        rows.append(dict(URL=f"img{i}.png", TEXT=f"a picture {i}", punsafe=punsafe, WIDTH=width,
                         similarity=sim, hash=f"{i:032x}", aesthetic_score=5.0 + i / 4))
    path = tmp_path / "laion.parquet"
    pd.DataFrame(rows).to_parquet(path, index=False)
    return path


def test_row_filter_and_extra_columns(tmp_path):
    manifest_path = _laion(tmp_path)
    cfg = load_config(PrepConfig, TINY, [
        "manifest.filter=punsafe < 0.5 and WIDTH >= 256 and similarity > 0.28",
        "manifest.extra_columns=[similarity, punsafe, hash, aesthetic_score]",
        "samples_per_shard=8",
    ])
    manifest = Manifest(str(manifest_path), "images", cfg.manifest, {})
    plan = next(ShardPlanner(manifest, cfg.samples_per_shard).run())
    stats = ShardTask(cfg, str(tmp_path / "out"), "fp").run(plan)
    table = _status(tmp_path / "out", "images")
    assert len(table) == 5  # every manifest row accounted for
    assert list(table.status) == ["ok", "failed", "failed", "failed", "ok"]
    assert list(table.reason.fillna("")) == ["", "filtered", "filtered", "filtered", ""]
    assert stats["reasons"] == {"filtered": 3} and stats["ok"] == 2
    assert table.detail[1].startswith(str(tmp_path / "img1.png")) and "manifest row 1" in table.detail[1]
    # extra columns: in the status table for every row, in KEY.json for the samples
    assert list(table.similarity) == [0.31, 0.30, 0.33, 0.2, 0.4]
    assert list(table.hash) == [f"{i:032x}" for i in range(5)]
    assert "WIDTH" not in table.columns  # read for the filter only
    samples = _samples(tmp_path / "out", "images")
    assert set(samples) == set(table.key[table.status == "ok"])
    extra = samples[table.key[4]]["extra"]
    assert extra == {"similarity": 0.4, "punsafe": 0.05, "hash": f"{4:032x}", "aesthetic_score": 6.0}


@pytest.mark.parametrize("override", ["manifest.extra_columns=[]", None])
def test_no_extra_key_without_extra_columns(tmp_path, override):
    manifest_path = _laion(tmp_path)
    cfg = load_config(PrepConfig, TINY, [o for o in [override, "samples_per_shard=2"] if o])
    manifest = Manifest(str(manifest_path), "images", cfg.manifest, {})
    plan = next(ShardPlanner(manifest, cfg.samples_per_shard).run())
    ShardTask(cfg, str(tmp_path / "out"), "fp").run(plan)
    assert all("extra" not in meta for meta in _samples(tmp_path / "out", "images").values())
    assert list(_status(tmp_path / "out", "images").status) == ["ok", "ok"]


def test_extra_columns_keep_the_manifest_type_in_every_shard(tmp_path):
    # Shard 0's similarity values are all null: its status column must still be float64 (and a
    # binary column text), or pyarrow.dataset cannot read the shards as one table.
    import pyarrow as pa
    import pyarrow.dataset as pads

    rows = []
    for i in range(4):
        Image.new("RGB", (64, 48), (40 * i, 80, 200)).save(tmp_path / f"img{i}.png")
        rows.append(dict(URL=f"img{i}.png", TEXT=f"a picture {i}", similarity=None if i < 2 else 0.3 + i / 10,
                         hash=bytes([i]) * 4))
    table = pa.Table.from_pylist(rows, schema=pa.schema(
        [("URL", pa.string()), ("TEXT", pa.string()), ("similarity", pa.float64()), ("hash", pa.binary())]))
    import pyarrow.parquet as pq

    pq.write_table(table, tmp_path / "laion.parquet")
    cfg = load_config(PrepConfig, TINY, ["manifest.extra_columns=[similarity, hash]", "samples_per_shard=2"])
    manifest = Manifest(str(tmp_path / "laion.parquet"), "images", cfg.manifest, {})
    for plan in ShardPlanner(manifest, cfg.samples_per_shard).run():
        ShardTask(cfg, str(tmp_path / "out"), "fp").run(plan)
    got = pads.dataset(tmp_path / "out" / "images", format="parquet", exclude_invalid_files=True).to_table()
    assert got.schema.field("similarity").type == pa.float64()
    assert got.schema.field("hash").type == pa.string()
    assert got.column("similarity").to_pylist() == [None, None, 0.5, 0.6]
    assert got.column("hash").to_pylist() == [(bytes([i]) * 4).hex() for i in range(4)]
