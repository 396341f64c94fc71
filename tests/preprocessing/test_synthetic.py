"""The synthetic data generator: real files, manifests in three formats, determinism."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import av
import pandas as pd

REPO = Path(__file__).resolve().parents[2]


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.suffix not in (".parquet",)}


def test_cli_is_deterministic_and_writes_manifests(tmp_path):
    # same seed, same folder -> byte-identical files (manifests hold absolute paths)
    runs = []
    for _ in range(2):
        out = tmp_path / "set"
        subprocess.run([sys.executable, "-m", "preprocessing.synthetic", "--out", str(out), "--videos", "3",
                        "--images", "2", "--seed", "7", "--seconds", "1"], check=True, cwd=REPO,
                       capture_output=True)
        runs.append(digest(out))
    assert runs[0] == runs[1]
    for name, column in (("videos", "video"), ("images", "image")):
        frames = [pd.read_parquet(out / f"{name}.parquet"), pd.read_csv(out / f"{name}.csv"),
                  pd.read_json(out / f"{name}.jsonl", lines=True)]
        for frame in frames:
            assert list(frame.columns) == [column, "caption"]
            assert frame[column].tolist() == frames[0][column].tolist()
            assert all(Path(p).is_file() for p in frame[column])


def test_videos_are_real_and_varied(synthetic):
    seen = set()
    for row in synthetic["videos"]:
        if "/bad/" in row["video"]:
            continue
        with av.open(row["video"]) as container:
            stream = container.streams.video[0]
            seen.add((container.format.name.split(",")[0], stream.codec_context.name))
            truth = synthetic["truth"][row["video"]]
            assert [stream.codec_context.width, stream.codec_context.height] == truth["size"]
            assert abs(float(stream.average_rate) - truth["fps"]) < 0.01
        assert "square" in row["caption"]
    assert {("mov", "h264"), ("avi", "mpeg4"), ("matroska", "vp9")} <= seen
    speeds = {t["speed_px_per_s"] for t in synthetic["truth"].values()}
    changes = {t["appearance_change"] for t in synthetic["truth"].values()}
    assert len(speeds) >= 3 and len(changes) >= 2


def test_bad_inputs_are_listed(synthetic):
    expected = json.loads((synthetic["root"] / "expected_failures.json").read_text())
    assert expected == synthetic["expected_failures"]
    manifest = set(pd.read_parquet(synthetic["root"] / "videos.parquet").video) | \
        set(pd.read_parquet(synthetic["root"] / "images.parquet").image)
    assert set(expected) <= manifest
