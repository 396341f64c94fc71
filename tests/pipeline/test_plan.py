"""Planning off the driver (issue 15): plans are (file, row range) descriptions built from
footers; shard tasks read their rows; CSV/JSONL are converted once under OUT/_plan; duplicates
come from a distributed pass."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.config import load_config
from pipeline.config import PrepConfig
from pipeline.dedupe import find_duplicates
from pipeline.manifest import Manifest, ManifestError
from pipeline.plan import ShardPlanner


def _cfg(*overrides: str):
    return load_config(PrepConfig, None, list(overrides)).manifest


def _parts(folder, sizes, row_group=3, prefix="/v"):
    """Parquet files of `sizes` rows; row i of the concatenation is `{prefix}/{i}.mp4`."""
    folder.mkdir(exist_ok=True)
    row = 0
    for n, size in enumerate(sizes):
        ids = range(row, row + size)
        table = pa.table({"video": [f"{prefix}/{i}.mp4" for i in ids], "caption": [f"c{i}" for i in ids],
                          "span": [[i, i + 1] for i in ids]})
        pq.write_table(table, folder / f"part-{n}.parquet", row_group_size=row_group)
        row += size
    return row


def test_plans_hold_no_rows_and_pickle_small(tmp_path):
    rows = 300_000
    ids = np.arange(rows)
    table = pa.table({"video": [f"s3://b/{i:09d}.mp4" for i in ids], "caption": ["a caption"] * rows})
    for n in range(3):
        pq.write_table(table.slice(n * 100_000, 100_000), tmp_path / f"m{n}.parquet", row_group_size=10_000)
    del table
    manifest = Manifest(str(tmp_path / "m*.parquet"), "videos", _cfg(), {})
    plans = list(ShardPlanner(manifest, 1000).run())
    assert len(plans) == 300 and sum(p.rows for p in plans) == rows
    for plan in plans:  # descriptions only: no row was read on the "driver"
        assert plan.sources == [] and plan.captions == [] and plan.columns == {} and plan.fetch_urls == {}
        assert not plan.materialized and 1 <= len(plan.pieces) <= 2
    assert max(len(pickle.dumps(p)) for p in plans) < 2000
    # The manifest itself keeps O(files): three records, no row lists.
    assert len(manifest.file_records()) == 3 and not manifest.rows_streamed
    assert sum(len(v) for v in vars(manifest).values() if isinstance(v, (list, dict))) < 50
    # A task materializes its own rows, exactly those of its range.
    plan = plans[123].materialize()
    assert plan.sources == [f"s3://b/{i:09d}.mp4" for i in range(123_000, 124_000)]


@pytest.mark.parametrize("batch_rows", [2, 1000])
def test_shard_n_holds_rows_n_s_across_files_and_row_groups(tmp_path, batch_rows):
    total = _parts(tmp_path / "m", [7, 5, 1, 10])
    manifest = Manifest(str(tmp_path / "m"), "videos", _cfg(f"manifest.batch_rows={batch_rows}"), {})
    manifest.extra_names.append("span")  # the hook clips / extra columns use
    plans = [p.materialize() for p in ShardPlanner(manifest, 4).run()]
    assert [(p.index, p.first_row, len(p.sources)) for p in plans] == [
        (n, 4 * n, min(4, total - 4 * n)) for n in range(6)]
    for plan in plans:
        ids = range(plan.first_row, plan.first_row + len(plan.sources))
        assert plan.sources == [f"/v/{i}.mp4" for i in ids]
        assert plan.captions == [f"c{i}" for i in ids]
        assert plan.columns == {"span": [[i, i + 1] for i in ids]}
    straddling = plans[1]  # rows 4..7: 3 from part-0, 1 from part-1
    assert [(os.path.basename(p.file), p.start, p.stop) for p in straddling.pieces] == [
        ("part-0.parquet", 4, 7), ("part-1.parquet", 0, 1)]
    fields = straddling.commit_fields()
    assert [f["start"] for f in fields["pieces"]] == [4, 0] and len(fields["sources_digest"]) == 32
    assert plans[2].commit_fields()["sources_digest"] != fields["sources_digest"]


def test_relative_paths_and_redaction_happen_in_the_task(tmp_path):
    signed = "https://cdn.test/a.png?X-Amz-Signature=abcdef&x=1"
    pd.DataFrame({"image": ["rel/a.png", signed, None], "caption": ["a", "b", "c"]}).to_parquet(
        tmp_path / "m.parquet")
    manifest = Manifest(str(tmp_path / "m.parquet"), "images", _cfg(), {})
    (plan,) = [p.materialize() for p in ShardPlanner(manifest, 10).run()]
    assert plan.sources[0] == str(tmp_path / "rel" / "a.png")
    assert "abcdef" not in plan.sources[1] and plan.fetch_urls == {1: signed}
    assert plan.sources[2] is None


def test_unreadable_footer_names_the_file(tmp_path):
    _parts(tmp_path / "m", [3, 3])
    (tmp_path / "m" / "part-1.parquet").write_bytes(b"PAR1 not a footer")
    manifest = Manifest(str(tmp_path / "m" / "part-0.parquet"), "videos", _cfg(), {})
    assert manifest.file_records()[0]["rows"] == 3
    with pytest.raises(ManifestError, match=r"part-1\.parquet.*footer"):
        Manifest(str(tmp_path / "m" / "*.parquet"), "videos", _cfg(), {}).file_records()


def test_csv_converted_once_reused_and_redone_on_change(tmp_path, ray_session):
    src = tmp_path / "in"
    src.mkdir()
    csv = src / "m.csv"
    frame = pd.DataFrame({"video": ["clips/a.mp4", "/abs/b.mp4", "clips/c.mp4"],
                          "caption": ["1", "two", "3"]})
    frame.to_csv(csv, index=False)
    root = str(tmp_path / "out" / "_plan")

    def manifest():
        return Manifest(str(csv), "videos", _cfg(), {}, plan_root=root)

    first = manifest()
    assert first.count_rows() is None and first.file_records()[0]["rows"] is None  # --dry-run: "?"
    first.convert()
    assert first.count_rows() == 3
    converted = first.read_urls[str(csv)]
    assert converted.startswith(root) and os.path.exists(converted)
    stamp = os.stat(converted).st_mtime_ns
    plans = [p.materialize() for p in ShardPlanner(first, 2).run()]
    sources = [s for p in plans for s in p.sources]
    # Relative paths resolve against the ORIGINAL file's folder, not OUT/_plan.
    assert sources == [str(src / "clips" / "a.mp4"), "/abs/b.mp4", str(src / "clips" / "c.mp4")]
    assert [c for p in plans for c in p.captions] == ["1", "two", "3"]  # strings, as read from CSV

    again = manifest()  # a rerun: the footer of the existing conversion gives the rows
    assert again.count_rows() == 3
    again.convert()
    assert again.read_urls[str(csv)] == converted and os.stat(converted).st_mtime_ns == stamp

    with open(csv, "a") as f:
        f.write("clips/d.mp4,four\n")
    changed = manifest()
    assert changed.count_rows() is None
    changed.convert()
    assert changed.count_rows() == 4 and changed.read_urls[str(csv)] != converted


def test_jsonl_converted(tmp_path, ray_session):
    path = tmp_path / "m.jsonl"
    pd.DataFrame({"video": [f"/v/{i}.mp4" for i in range(5)], "caption": list("abcde")}).to_json(
        path, orient="records", lines=True)
    m = Manifest(str(path), "videos", _cfg(), {}, plan_root=str(tmp_path / "_plan"))
    m.convert()
    plans = [p.materialize() for p in ShardPlanner(m, 2).run()]
    assert [s for p in plans for s in p.sources] == [f"/v/{i}.mp4" for i in range(5)]


def test_dedupe_pass_across_shards_and_files(tmp_path, ray_session):
    folder = tmp_path / "m"
    folder.mkdir()
    names = ["a", "b", "a", "c", "d", "b", "e", "a", "f", None, "d"]  # rows 0..10
    sources = [None if n is None else f"/v/{n}.mp4" for n in names]
    pd.DataFrame({"video": sources[:6], "caption": ["x"] * 6}).to_parquet(folder / "p0.parquet")
    pd.DataFrame({"video": sources[6:], "caption": ["x"] * 5}).to_parquet(folder / "p1.parquet")
    m = Manifest(str(folder), "videos", _cfg(), {}, plan_root=str(tmp_path / "_plan"))
    index = find_duplicates(m, 3)
    assert index.stats["duplicates"] == 4 and index.stats["hashed"] == 10
    plans = []
    for plan in ShardPlanner(m, 3).run():
        plan.duplicates = index.path(plan.index)
        plans.append(plan.materialize())
    found = {p.first_row + pos: first for p in plans for pos, first in p.duplicate_of.items()}
    assert found == {2: 0, 5: 1, 7: 0, 10: 4}
    assert index.shards == {0, 1, 2, 3}
    # A rerun over the same files reuses the pass; the intermediate records are gone.
    again = find_duplicates(m, 3)
    assert again.folder == index.folder and again.shards == index.shards
    assert sorted(os.listdir(index.folder)) == ["done.json"] + [f"shard-{i:06d}.npy" for i in range(4)]


def test_signed_urls_in_a_csv_are_sealed_in_its_conversion(tmp_path, ray_session):
    signed = "https://cdn.test/a.png?X-Amz-Signature=0123456789abcdef&n=1"
    path = tmp_path / "m.csv"
    frame = pd.DataFrame({"image": [signed, "https://cdn.test/plain.png"], "caption": ["a", "b"]})
    frame.to_csv(path, index=False)
    m = Manifest(str(path), "images", _cfg(), {}, plan_root=str(tmp_path / "_plan"))
    m.convert()
    converted = m.read_urls[str(path)]
    assert b"0123456789abcdef" not in open(converted, "rb").read()
    (plan,) = [p.materialize() for p in ShardPlanner(m, 10).run()]
    assert plan.fetch_urls == {0: signed} and "0123456789abcdef" not in plan.sources[0]
    assert plan.sources[1] == "https://cdn.test/plain.png"
    # Another run (another in-memory key) cannot open them: it converts the file again.
    again = Manifest(str(path), "images", _cfg(), {}, plan_root=str(tmp_path / "_plan"))
    again.convert()
    (plan,) = [p.materialize() for p in ShardPlanner(again, 10).run()]
    assert plan.fetch_urls == {0: signed}


def test_a_file_without_the_columns_is_named_from_its_footer(tmp_path):
    _parts(tmp_path / "m", [3])
    pd.DataFrame({"video": ["/v/x.mp4"]}).to_parquet(tmp_path / "m" / "part-1.parquet")
    with pytest.raises(ManifestError, match=r"part-1\.parquet has no column 'caption'"):
        Manifest(str(tmp_path / "m"), "videos", _cfg(), {}).file_records()
