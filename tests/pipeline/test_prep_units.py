"""Fast tests of the preprocessing job's parts, no Ray: config, manifests, shard planning,
the writer's commit protocol, HTTP fetching, and the errors raised before any work."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.config import ConfigError, load_config
from core.shards import STATUS_COLUMNS
from pipeline.config import PrepConfig, prep_fingerprint
from pipeline.fetch import Fetcher
from pipeline.manifest import Manifest, ManifestError, ShardPlanner
from pipeline.storage import OutputStore
from pipeline.writer import ShardWriter

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "prep" / "tiny.yaml")


def test_configs_load_and_validate():
    tiny = load_config(PrepConfig, TINY)
    assert (tiny.video.frames, tiny.video.width, tiny.video.height, tiny.models.vae) == (8, 128, 64, "tiny")
    full = load_config(PrepConfig, REPO / "configs" / "prep" / "default.yaml")
    assert (full.video.frames, full.video.width, full.video.height) == (32, 448, 256)
    for override, field in [
        ("execution.workers=-1", "execution.workers"),
        ("http.timeout_s=0", "http.timeout_s"),
        ("samples_per_shard=0", "samples_per_shard"),
        ("execution.gpus_per_encoder=1.5", "execution.gpus_per_encoder"),
        ("manifest.video_column=", "manifest.video_column"),
    ]:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            load_config(PrepConfig, TINY, [override])
    with pytest.raises(ConfigError, match="execution.wokers"):
        load_config(PrepConfig, TINY, ["execution.wokers=2"])


def test_fingerprint_covers_output_not_operations():
    base = prep_fingerprint(load_config(PrepConfig, TINY))
    assert (
        prep_fingerprint(
            load_config(
                PrepConfig, TINY, ["execution.workers=7", "http.retries=9", "storage.options.key=secret"]
            )
        )
        == base
    )
    assert prep_fingerprint(load_config(PrepConfig, TINY, ["video.frames=4"])) != base
    assert prep_fingerprint(load_config(PrepConfig, TINY, ["samples_per_shard=9"])) != base


def _rows(manifest: Manifest) -> list[tuple]:
    return [row for sources, captions in manifest.batches() for row in zip(sources, captions)]


def test_manifest_formats_dirs_globs_and_laion_columns(synthetic, tmp_path):
    cfg = PrepConfig().manifest
    expected = _rows(Manifest(str(synthetic / "videos.parquet"), "videos", cfg, {}))
    assert len(expected) == len(pd.read_parquet(synthetic / "videos.parquet"))
    for name in ("videos.csv", "videos.jsonl"):
        assert _rows(Manifest(str(synthetic / name), "videos", cfg, {})) == expected
    frame = pd.read_parquet(synthetic / "videos.parquet")
    parts = tmp_path / "parts"
    parts.mkdir()
    # Sorted path order defines row order across files.
    frame[:5].to_parquet(parts / "a.parquet")
    frame[5:].to_parquet(parts / "b.parquet")
    assert _rows(Manifest(str(parts), "videos", cfg, {})) == expected
    assert _rows(Manifest(str(parts / "*.parquet"), "videos", cfg, {})) == expected
    # LAION style: URL / TEXT columns and extra columns; relative paths resolve to the file.
    laion = pd.DataFrame(
        {
            "URL": ["images/a.png", "http://x.test/b.jpg"],
            "TEXT": ["a", None],
            "WIDTH": [1, 2],
            "HEIGHT": [3, 4],
        }
    )
    laion.to_parquet(tmp_path / "laion.parquet")
    rows = _rows(Manifest(str(tmp_path / "laion.parquet"), "images", cfg, {}))
    assert rows == [(str(tmp_path / "images" / "a.png"), "a"), ("http://x.test/b.jpg", None)]


def test_manifest_errors_name_the_problem(tmp_path):
    cfg = PrepConfig().manifest
    pd.DataFrame({"path": ["a.mp4"], "caption": ["x"]}).to_parquet(tmp_path / "m.parquet")
    with pytest.raises(ManifestError, match=r"no column 'video'.*manifest\.video_column"):
        Manifest(str(tmp_path / "m.parquet"), "videos", cfg, {})
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ManifestError, match="junk.parquet"):
        Manifest(str(tmp_path / "junk.parquet"), "videos", cfg, {})
    with pytest.raises(ManifestError, match="no such file"):
        Manifest(str(tmp_path / "absent.parquet"), "videos", cfg, {})


def test_planner_shard_boundaries_across_batches(tmp_path):
    pd.DataFrame({"video": [f"/v/{i}.mp4" for i in range(10)], "caption": ["c"] * 10}).to_parquet(
        tmp_path / "m.pq"
    )
    for batch_rows in (3, 100):
        cfg = load_config(PrepConfig, None, [f"manifest.batch_rows={batch_rows}"]).manifest
        planner = ShardPlanner(Manifest(str(tmp_path / "m.pq"), "videos", cfg, {}), 4)
        plans = [p.materialize() for p in planner.run()]
        assert [(p.index, p.first_row, len(p.sources)) for p in plans] == [(0, 0, 4), (1, 4, 4), (2, 8, 2)]
        assert plans[1].sources == [f"/v/{i}.mp4" for i in range(4, 8)]


class RecordingStore(OutputStore):
    """Records the final names published, in order (the commit protocol under test is the writer's)."""

    def __init__(self, url: str):
        super().__init__(url)
        self.published: list[str] = []

    def publish(self, tmp: str, final: str) -> None:
        self.published.append(final.rsplit("/", 1)[-1])
        super().publish(tmp, final)


def _write(store: OutputStore) -> dict:
    writer = ShardWriter(store, "videos", 3)
    writer.add_ok(
        "k1", "/a.mp4", "cap a", [("k1.json", b"{}"), ("k1.latents.npy", b"\x00" * 100), ("k1.txt", b"a")],
        shard=3, row=10,
    )
    writer.add_failed("k2", "/b.mp4", "cap b", "decode_error", "/b.mp4: broken", shard=3, row=11)
    writer.add_ok("k3", "/c.mp4", "cap c", [("k3.json", b"{}"), ("k3.txt", b"c")], shard=3, row=12)
    return writer.commit({"seconds": 1.0})


def test_writer_is_deterministic_and_commits_json_last(tmp_path):
    stores = [RecordingStore(str(tmp_path / name)) for name in ("one", "two")]
    stats = [_write(s) for s in stores]
    assert stores[0].published == ["000003.tar", "000003.parquet", "000003.json"]
    tars = [(tmp_path / name / "videos" / "000003.tar").read_bytes() for name in ("one", "two")]
    assert tars[0] == tars[1]
    with tarfile.open(fileobj=io.BytesIO(tars[0])) as tar:
        infos = tar.getmembers()
    assert [i.name for i in infos] == ["k1.json", "k1.latents.npy", "k1.txt", "k3.json", "k3.txt"]
    assert {(i.mtime, i.uid, i.gid, i.uname, i.gname, i.mode) for i in infos} == {(0, 0, 0, "", "", 0o444)}
    status = pd.read_parquet(tmp_path / "one" / "videos" / "000003.parquet")
    assert status.columns.tolist() == list(STATUS_COLUMNS)  # the typed columns, in order
    schema = pq.read_schema(tmp_path / "one" / "videos" / "000003.parquet")
    assert schema.field("row").type == pa.int64() and schema.field("motion_mean").type == pa.float64()
    assert status.row.tolist() == [10, 11, 12] and status.shard.tolist() == [3, 3, 3]
    assert status.status.tolist() == ["ok", "failed", "ok"] and status.reason[1] == "decode_error"
    on_disk = json.loads((tmp_path / "one" / "videos" / "000003.json").read_text())
    assert on_disk["ok"] == stats[0]["ok"] == 2 and on_disk["reasons"] == {"decode_error": 1}
    assert stores[0].committed("videos") == {3}
    assert not [p for p in (tmp_path / "one" / "_tmp").rglob("*") if p.is_file()]  # no temp file left


def test_aborted_shard_leaves_no_final_files(tmp_path):
    store = OutputStore(str(tmp_path))
    writer = ShardWriter(store, "images", 0)
    writer.add_ok("k", "/a.png", "a", [("k.txt", b"a")])
    writer.abort()
    assert store.list_shards("images") == {}
    assert not [p for p in (tmp_path / "_tmp").rglob("*") if p.is_file()]


def test_listing_finds_committed_shards_only(tmp_path):
    store = OutputStore(str(tmp_path))
    folder = tmp_path / "videos"
    folder.mkdir()
    for name in (
        "000000.tar",
        "000000.parquet",
        "000000.json",
        "000001.tar",
        "000002.json",
        "notes.txt",
        "000003.tar.partial",
    ):
        (folder / name).write_bytes(b"x")
    assert store.committed("videos") == {0, 2}
    assert store.list_shards("videos")[1] == {"tar"}
    assert store.committed("images") == set()


def test_http_fetch_retries_and_classifies(media_server):
    base, hits, _ = media_server
    # The media server is on loopback, blocked by default: the test carves out 127.0.0.1 only.
    overrides = [
        "http.timeout_s=1",
        "http.retries=2",
        "http.backoff_s=0.05",
        "http.allowed_networks=[127.0.0.1]",
    ]
    cfg = load_config(PrepConfig, TINY, overrides).http
    fetcher = Fetcher(cfg)
    results = list(
        fetcher.prefetch(
            [f"{base}/missing.png", f"{base}/flaky.png", "/local/file.png", None, f"{base}/stall.png"]
        )
    )
    assert results[0][1].reason == "not_found" and "404" in results[0][1].detail
    assert hits["/missing.png"] == 1  # permanent: not retried
    assert results[1][1] is None and len(results[1][0]) > 100
    assert hits["/flaky.png"] == 3  # two 503s, then the body
    assert results[2] == (None, None) and results[3] == (None, None)  # local paths are read by the Decoder
    assert results[4][1].reason == "timeout" and hits["/stall.png"] == 3


def test_errors_before_any_work(prep, synthetic, tmp_path, capsys):
    good = str(synthetic / "ten.parquet")
    pd.DataFrame({"path": ["a.mp4"], "caption": ["x"]}).to_parquet(tmp_path / "nocol.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 this is not a parquet file")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    cases = [
        (
            ["--videos", str(tmp_path / "nocol.parquet"), "--out", str(tmp_path / "o1")],
            "manifest.video_column",
        ),
        (["--videos", str(tmp_path / "absent.jsonl"), "--out", str(tmp_path / "o2")], "absent.jsonl"),
        (["--videos", str(tmp_path / "junk.parquet"), "--out", str(tmp_path / "o2")], "junk.parquet"),
        (["--videos", good, "--out", str(blocker / "out")], "not writable"),
        (["--out", str(tmp_path / "o3")], "--videos"),
        (["--videos", good, "--out", str(tmp_path / "o4"), "video.width=100"], "video.width"),
    ]
    for argv, message in cases:
        assert prep(*argv) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o1" / "videos").exists() and not (tmp_path / "o4").exists()
