"""Resume that verifies (issue 15): a rerun notices a changed, removed or unreadable manifest
file before any work; files appended in glob order are incremental; `--dry-run` prints the plan."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture
def parts(synthetic, tmp_path):
    """The 6 good images as a glob of two parquet files (4 + 2 rows); 4 rows per shard."""
    images = pd.read_parquet(synthetic / "good_images.parquet")
    folder = tmp_path / "manifest"
    folder.mkdir()
    images[:4].to_parquet(folder / "part-0.parquet", index=False)
    images[4:6].to_parquet(folder / "part-1.parquet", index=False)
    return folder, images


def run(prep, folder, out, *extra):
    return prep("--images", str(folder / "part-*.parquet"), "--out", str(out), "--samples-per-shard", "4",
                *extra)


def committed_at(out):
    markers = sorted((out / "images").glob("*.json"))
    return {p.name: json.loads(p.read_text())["committed_at"] for p in markers}


def test_changed_removed_appended_and_dry_run(parts, ray_session, prep, tmp_path, capsys):
    folder, images = parts
    out = tmp_path / "out"
    assert run(prep, folder, out) == 0
    recorded = json.loads((out / "dataset.json").read_text())["manifest_files"]["images"]
    assert [(os.path.basename(f["path"]), f["rows"]) for f in recorded] == [("part-0.parquet", 4),
                                                                             ("part-1.parquet", 2)]
    before = committed_at(out)
    assert list(before) == ["000000.json", "000001.json"]

    # Appended file: shard 1 (partial: rows 4..5) is redone whole, shard 0 untouched, shard 2 new.
    extra = images[:3].assign(caption=["appended a", "appended b", "appended c"])
    extra.to_parquet(folder / "part-2.parquet", index=False)
    capsys.readouterr()
    assert run(prep, folder, out, "--dry-run") == 0
    plan = capsys.readouterr().out
    assert "1 file(s) appended" in plan and " 9 " in plan  # 9 rows now
    assert committed_at(out) == before  # the dry run wrote nothing
    assert run(prep, folder, out) == 0
    after = committed_at(out)
    assert after["000000.json"] == before["000000.json"]
    assert after["000001.json"] > before["000001.json"] and "000002.json" in after
    status = pd.read_parquet(out / "images" / "000002.parquet")
    assert status.caption.tolist() == ["appended c"]
    redone = pd.read_parquet(out / "images" / "000001.parquet")
    assert redone.caption.tolist()[2:] == ["appended a", "appended b"] and len(redone) == 4

    # Changed file: stops before any work, naming the file and the first affected shard.
    images[:4].assign(caption="edited").to_parquet(folder / "part-1.parquet", index=False)
    capsys.readouterr()
    assert run(prep, folder, out) == 2
    err = capsys.readouterr().err
    assert "part-1.parquet" in err and "shard 000001" in err and "--overwrite" in err
    assert committed_at(out) == after
    assert run(prep, folder, out, "--dry-run") == 2
    assert "would refuse" in capsys.readouterr().out

    # A glob that now matches fewer files.
    images[4:6].to_parquet(folder / "part-1.parquet", index=False)
    os.utime(folder / "part-1.parquet", ns=(0, 0))  # the original's mtime is gone either way
    (folder / "part-2.parquet").unlink()
    assert run(prep, folder, out) == 2
    err = capsys.readouterr().err
    assert "part-1.parquet" in err or "part-2.parquet" in err

    # --overwrite starts again from today's files.
    assert run(prep, folder, out, "--overwrite") == 0
    assert list(committed_at(out)) == ["000000.json", "000001.json"]


def test_unreadable_footer_stops_before_any_shard(parts, tmp_path, prep, capsys):
    folder, _ = parts
    (folder / "part-1.parquet").write_bytes(b"PAR1 this is not a parquet footer")
    out = tmp_path / "out"
    assert run(prep, folder, out) == 2
    err = capsys.readouterr().err
    assert "part-1.parquet" in err
    assert not (out / "images").exists() or not list((out / "images").iterdir())
