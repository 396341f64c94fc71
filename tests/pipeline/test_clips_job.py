"""Clip spans through the whole job (tiny models, the session's Ray): Panda-70M CSV and
parquet, InternVid JSONL with a source template, generic columns. Every clip is one sample
and one status row, its frames inside its span, its own caption; bad spans fail with their
codes; each video is opened once per shard (the decoder child's own count); reruns and
--retry-failed give the same bytes."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from core.shard_format import sample_key
from testing.long_video import write_long_video

pytestmark = pytest.mark.slow

VIDEOS = {"a": (30, 24), "b": (20, 30), "c": (12, 25)}  # name -> (seconds, fps)


def status(out: Path) -> pd.DataFrame:
    files = sorted((out / "videos").glob("*.parquet"))
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def samples(out: Path) -> dict[str, dict]:
    found: dict[str, dict] = {}
    for path in sorted((out / "videos").glob("*.tar")):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                if ext in ("json", "txt"):
                    found.setdefault(key, {})[ext] = tar.extractfile(m).read().decode()
    return found


def shard_bytes(out: Path) -> dict[str, bytes]:
    files = sorted((out / "videos").glob("*"))
    return {p.name: p.read_bytes() for p in files if p.suffix in (".tar", ".parquet")}


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clips")
    for name, (seconds, fps) in VIDEOS.items():
        write_long_video(root / f"{name}.mp4", seconds, fps=fps)
    return root


def panda_rows(root: Path) -> list[dict]:
    ts = lambda *pairs: [[f"0:00:{a:06.3f}", f"0:00:{b:06.3f}"] for a, b in pairs]  # noqa: E731
    return [
        dict(videoID="a", url=str(root / "a.mp4"), timestamp=ts((1, 3), (5.5, 8), (29, 45), (10, 10.2)),
             caption=["a one", "a two", "a past the end", "a too short"], matching_score=[0.4] * 4),
        dict(videoID="b", url=str(root / "b.mp4"), timestamp=ts((0, 2), (10, 12.5)),
             caption=["b one", "b two"], matching_score=[0.3, 0.3]),
        dict(videoID="c", url=str(root / "c.mp4"), timestamp="[[0, oops", caption="['c']",
             matching_score="[0.1]"),
        dict(videoID="c", url=str(root / "c.mp4"), timestamp=ts((1, 3), (4, 6.5)), caption=["only one"],
             matching_score=[0.2]),
        dict(videoID="c", url=str(root / "c.mp4"), timestamp=ts((1, 3), (4, 6)), caption=["c one", "c two"],
             matching_score=[0.2, 0.2]),
    ]


@pytest.fixture(scope="module")
def panda_run(media, ray_session, prep_once, tmp_path_factory):
    rows = panda_rows(media)
    pd.DataFrame([{k: str(v) if isinstance(v, list) else v for k, v in r.items()} for r in rows]).to_csv(
        media / "panda.csv", index=False)  # as shipped: Python-literal list strings
    out = tmp_path_factory.mktemp("panda") / "out"
    assert prep_once("--videos", str(media / "panda.csv"), "--out", str(out), "samples_per_shard=2") == 0
    return out, rows


def test_panda70m_csv_every_clip_accounted_for(panda_run, media):
    out, rows = panda_run
    table = status(out)
    assert table.row.tolist() == [0, 0, 0, 0, 1, 1, 2, 3, 4, 4]  # one status row per clip
    assert table.shard.tolist() == [0] * 6 + [1] * 2 + [2] * 2  # a row's clips stay in its shard
    assert table.status.tolist().count("ok") == 6
    reasons = dict(zip(zip(table.row, table.clip_start), table.reason))
    assert reasons[(0, 29.0)] == "bad_span" and reasons[(0, 10.0)] == "too_short"
    assert table.reason[6] == "bad_span" and "manifest row 2" in table.detail[6]  # spans do not parse
    assert table.reason[7] == "bad_caption" and "1 caption(s) for 2 clip span(s)" in table.detail[7]
    assert table.clip_start.isna().tolist() == [False] * 6 + [True, True] + [False] * 2
    ok = table[table.status == "ok"]
    assert ok.caption.tolist() == ["a one", "a two", "b one", "b two", "c one", "c two"]
    index = pd.read_parquet(out / "index.parquet")
    assert index.ok.sum() == 6 and index.failed.sum() == 4  # clips, not rows
    assert json.loads((out / "dataset.json").read_text())["totals"]["videos"]["ok"] == 6


def test_clip_samples_lie_inside_their_spans(panda_run, media):
    out, _ = panda_run
    found = samples(out)
    ok = status(out).query("status == 'ok'")
    assert len(found) == len(ok) == len(set(ok.key)) == 6  # keys distinct
    for r in ok.itertuples():
        span = (r.clip_start, r.clip_end)
        assert r.key == sample_key(r.source, span)
        meta = json.loads(found[r.key]["json"])
        seconds, fps = VIDEOS[Path(r.source).stem]
        assert meta["clip"] == list(span) and meta["native_fps"] == fps
        assert all(span[0] * fps <= i < span[1] * fps for i in meta["frame_indices"])
        assert meta["frame_indices"][-1] - meta["frame_indices"][0] == meta["stride"] * 7
        assert found[r.key]["txt"] == r.caption


def test_one_open_per_video_per_shard(panda_run):
    out, _ = panda_run
    opens = [json.loads((out / "videos" / f"00000{i}.json").read_text())["video_opens"] for i in range(3)]
    assert opens == [2, 0, 1]  # shard 0: a (4 clips) and b (2 clips); shard 1: no row decodes


def test_panda70m_parquet_gives_the_same_bytes(panda_run, media, prep, tmp_path):
    out, rows = panda_run
    rows = [dict(r) for r in rows]  # a list column cannot hold row 2's broken text: break it as a list
    rows[2].update(timestamp=[["0:00:00.000", "oops"]], caption=["c"], matching_score=[0.1])
    pd.DataFrame(rows).to_parquet(media / "panda.parquet", index=False)
    manifest = str(media / "panda.parquet")
    assert prep("--videos", manifest, "--out", str(tmp_path / "pq"), "samples_per_shard=2") == 0
    got, want = shard_bytes(tmp_path / "pq"), shard_bytes(out)
    tars = [{k: v for k, v in d.items() if k.endswith(".tar")} for d in (got, want)]
    assert tars[0] == tars[1]
    again, first = status(tmp_path / "pq"), status(out)
    assert again.drop(columns="detail").equals(first.drop(columns="detail"))  # real lists or literals
    assert again.reason[6] == "bad_span" and "'oops'" in again.detail[6]


def test_retry_failed_keeps_ok_clips(panda_run, media, prep, tmp_path):
    import shutil

    out, _ = panda_run
    again = tmp_path / "again"
    shutil.copytree(out, again)
    # =all: the clips' failures (too_short, bad_span) are permanent, which plain --retry-failed keeps
    assert prep("--videos", str(media / "panda.csv"), "--out", str(again), "samples_per_shard=2",
                "--retry-failed=all") == 0
    assert shard_bytes(again) == shard_bytes(out)  # the failed clips fail the same way; ok ones kept
    assert json.loads((again / "videos" / "000000.json").read_text())["retried"] is True


def test_internvid_jsonl_with_a_template(media, ray_session, prep, tmp_path):
    clips = [("a", "00:00:01.000", "00:00:03.000"), ("b", "00:00:00.500", "00:00:02.000"),
             ("a", "00:00:05.000", "00:00:07.250"), ("a", "00:00:01.000", "00:00:03.000"),
             ("b", "00:00:04.000", "00:00:06.000")]
    lines = [json.dumps(dict(YoutubeID=v, Start_timestamp=s, End_timestamp=e, Caption=f"clip {i}",
                             Aesthetic_Score=5.0, UMT_Score=0.4)) for i, (v, s, e) in enumerate(clips)]
    (tmp_path / "iv.jsonl").write_text("\n".join(lines) + "\n")  # the videos live elsewhere (media/)
    out = tmp_path / "out"
    template = f"manifest.source_template={media}/{{YoutubeID}}.mp4"
    args = ["--videos", str(tmp_path / "iv.jsonl"), "--out", str(out), template, "samples_per_shard=3"]
    assert prep(*args) == 0
    table = status(out)
    # Rows of one video are clips, not duplicates; the same clip again (row 3, next shard) is.
    assert table.status.tolist() == ["ok", "ok", "ok", "failed", "ok"] and table.reason[3] == "duplicate"
    assert "manifest row 0" in table.detail[3]
    assert table.caption.tolist() == [f"clip {i}" for i in range(5)]
    assert table.clip_start.tolist() == [1.0, 0.5, 5.0, 1.0, 4.0] and table.clip_end.tolist()[2] == 7.25
    assert table.source.tolist()[:2] == [str(media / "a.mp4"), str(media / "b.mp4")]
    # rows 0 and 2 name video a around b: decoded together, a opened once
    opens = [json.loads((out / "videos" / f"00000{i}.json").read_text())["video_opens"] for i in range(2)]
    assert opens == [2, 1]
    metas = [json.loads(s["json"]) for s in samples(out).values()]
    assert sorted(m["clip"][0] for m in metas) == [0.5, 1.0, 4.0, 5.0]


def test_generic_clips_column_with_one_caption(media, ray_session, prep, tmp_path):
    frame = pd.DataFrame({"video": [str(media / "b.mp4")], "caption": ["the same words"],
                          "spans": [[[2.0, 4.0], [6.0, 9.0], [9.0, 9.1]]]})
    frame.to_parquet(tmp_path / "m.parquet", index=False)
    roots = f"manifest.allowed_roots=[{media}]"
    assert prep("--videos", str(tmp_path / "m.parquet"), "--out", str(tmp_path / "out"),
                "manifest.clips_column=spans", roots) == 0
    table = status(tmp_path / "out")
    assert table.status.tolist() == ["ok", "ok", "failed"] and table.reason[2] == "too_short"
    assert set(table.caption) == {"the same words"}
    meta = pq.read_table(io.BytesIO((tmp_path / "out" / "videos" / "000000.parquet").read_bytes()))
    assert meta.num_rows == 3


def test_remote_video_fetched_once_and_opened_once(media, media_server, ray_session, prep, tmp_path):
    base, hits, files = media_server
    files["a.mp4"] = (media / "a.mp4").read_bytes()
    files["b.mp4"] = (media / "b.mp4").read_bytes()
    spans = [("a", 1, 3), ("b", 2, 4), ("a", 6, 8), ("a", 20, 22.5)]
    lines = [json.dumps(dict(YoutubeID=v, Start_timestamp=s, End_timestamp=e, Caption=f"remote {i}"))
             for i, (v, s, e) in enumerate(spans)]
    (tmp_path / "iv.jsonl").write_text("\n".join(lines) + "\n")
    template = f"manifest.source_template={base}/files/{{YoutubeID}}.mp4"
    # the media server is on loopback (blocked by default)
    args = ["--videos", str(tmp_path / "iv.jsonl"), template, "http.allowed_networks=[127.0.0.1]"]
    assert prep(*args, "--out", str(tmp_path / "out")) == 0
    table = status(tmp_path / "out")
    assert table.status.tolist() == ["ok"] * 4 and table.source[0] == f"{base}/files/a.mp4"
    assert hits["/files/a.mp4"] == 1 and hits["/files/b.mp4"] == 1  # one download per video
    assert json.loads((tmp_path / "out" / "videos" / "000000.json").read_text())["video_opens"] == 2
    assert prep(*args, "--out", str(tmp_path / "again")) == 0
    assert shard_bytes(tmp_path / "again") == shard_bytes(tmp_path / "out")  # a rerun: the same bytes
