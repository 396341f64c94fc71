"""Status tables carry what each row's processing learnt (shard, row, source size and
duration, the clip's factors), and read as one table with stock tools: `pyarrow.dataset`
(the folder also holds .tar and .json files) and DuckDB's `read_parquet`."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.status_fields import failed_fields, meta_fields, ok_fields

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def status_run(synthetic, ray_session, tmp_path_factory):
    """The generator's good and broken videos (a one-frame clip among them) and images, 4 rows a shard."""
    from pipeline.prep import main

    out = tmp_path_factory.mktemp("status") / "out"
    config = str(Path(__file__).parents[2] / "configs/prep/tiny.yaml")
    argv = ["--videos", str(synthetic / "videos.parquet"), "--images", str(synthetic / "images.parquet"),
            "--out", str(out), "--config", config, "--samples-per-shard", "4", "execution.progress=false"]
    assert main(argv) == 0
    return out


def status_rows(out: Path, kind: str) -> list[dict]:
    import pyarrow.dataset as ds

    return ds.dataset(str(out / kind), format="parquet", exclude_invalid_files=True).to_table().to_pylist()


def key_json(out: Path, kind: str) -> dict[str, dict]:
    metas = {}
    for tar_path in sorted((out / kind).glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    metas[member.name[:-5]] = json.load(tar.extractfile(member))
    return metas


def test_pyarrow_dataset_and_duckdb_read_the_status_tables(status_run):
    import duckdb
    import pyarrow.dataset as ds

    out = status_run
    assert any(p.suffix == ".tar" for p in (out / "videos").iterdir())  # not only parquet there
    table = ds.dataset(str(out / "videos"), format="parquet", exclude_invalid_files=True).to_table()
    shards = len(list((out / "videos").glob("*.parquet")))
    assert table.num_rows > 4 * (shards - 1) and shards > 1
    con = duckdb.connect()
    rows = con.execute(
        f"SELECT shard, row, status, reason, width, height, duration, motion_mean "
        f"FROM read_parquet('{out}/videos/*.parquet') ORDER BY row"
    ).fetchall()
    assert len(rows) == table.num_rows
    assert [r[1] for r in rows] == list(range(len(rows)))  # every manifest row, once
    assert [r[0] for r in rows] == [r[1] // 4 for r in rows]
    counts = dict(con.execute(
        f"SELECT status, count(*) FROM read_parquet('{out}/videos/*.parquet') GROUP BY status"
    ).fetchall())
    assert counts["ok"] == sorted(table.column("status").to_pylist()).count("ok") > 0
    types = dict(con.execute(
        f"SELECT column_name, column_type FROM "
        f"(DESCRIBE SELECT * FROM read_parquet('{out}/videos/*.parquet'))"
    ).fetchall())
    assert types["width"] == "BIGINT" and types["duration"] == "DOUBLE" and types["motion_mean"] == "DOUBLE"


def test_ok_rows_carry_source_size_duration_and_factors(status_run, synthetic):
    import av

    out = status_run
    rows = status_rows(out, "videos")
    metas = key_json(out, "videos")
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok
    for r in ok:
        meta = metas[r["key"]]
        with av.open(r["source"]) as container:
            stream = container.streams.video[0]
            size = (stream.codec_context.width, stream.codec_context.height)
            frames = sum(1 for _ in container.decode(video=0))  # some muxers store no count
            seconds = frames / float(stream.average_rate)
        assert (r["width"], r["height"]) == size
        assert r["duration"] == pytest.approx(seconds, rel=1e-3)
        assert r["motion_mean"] == pytest.approx(meta["motion_mean"])
        assert r["appearance_factor"] == pytest.approx(meta["appearance_factor"])
    assert any(r["motion_mean"] > 0 for r in ok)  # some synthetic clips are still, not all
    # The factors are those of the shard's own members: γa = 1 - A[0, F-1], the motion's mean.
    with tarfile.open(out / "videos" / "000000.tar") as tar:
        first = next(r for r in ok if r["shard"] == 0)
        motion = np.load(io.BytesIO(tar.extractfile(f"{first['key']}.motion.npy").read()))
        appearance = np.load(io.BytesIO(tar.extractfile(f"{first['key']}.appearance.npy").read()))
    assert first["motion_mean"] == pytest.approx(float(motion.mean()), rel=1e-6)
    assert first["appearance_factor"] == pytest.approx(float(1 - appearance[0, -1]), rel=1e-6)


def test_failed_rows_carry_what_is_known(status_run):
    import pyarrow.dataset as ds

    out = status_run
    rows = status_rows(out, "videos")
    short = [r for r in rows if r["reason"] == "too_short"]
    assert len(short) == 1
    assert (short[0]["width"], short[0]["height"]) == (64, 64)  # the generator's one grey frame
    assert short[0]["duration"] == pytest.approx(1 / 24, rel=1e-3)
    assert short[0]["motion_mean"] is None and short[0]["appearance_factor"] is None
    other = [r for r in rows if r["status"] == "failed" and r["reason"] != "too_short"]
    assert other and all(r["motion_mean"] is None for r in other)
    images = ds.dataset(str(out / "images"), format="parquet", exclude_invalid_files=True).to_table()
    ok_images = [r for r in images.to_pylist() if r["status"] == "ok"]
    assert ok_images and all(r["width"] and r["height"] and r["duration"] is None for r in ok_images)


def test_fields_from_metadata_units():
    meta = {"original_size": [640, 360], "num_source_frames": 48, "native_fps": 24.0,
            "motion_mean": 3.5, "appearance_factor": 0.25}
    assert meta_fields(meta) == dict(width=640, height=360, duration=2.0, motion_mean=3.5,
                                     appearance_factor=0.25)
    assert meta_fields({"native_fps": 0, "num_source_frames": 3, "motion_mean": float("nan")}) == {}
    assert ok_fields([("k.latents.npy", b"x"), ("k.json", json.dumps(meta).encode())])["width"] == 640
    assert ok_fields([("k.json", b"not json")]) == {}
    assert failed_fields(("failed", "decode_error", "x")) == {}
    assert failed_fields(("failed", "too_short", "x", {"original_size": [8, 6]})) == dict(width=8, height=6)
