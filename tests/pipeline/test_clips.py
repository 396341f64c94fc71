"""Clip spans, manifest side (no Ray): times and lists as datasets ship them, row -> clips,
layout detection (Panda-70M CSV and parquet, InternVid JSONL with a source template, generic
start/end and clips columns), manifest-level errors, keys and duplicate identity."""

from __future__ import annotations

import hashlib
import json

import pandas as pd
import pytest

from core.config import ConfigError
from core.shard_format import sample_key
from pipeline.clips import Clip, RowError, parse_list, parse_spans, parse_time, row_clips
from pipeline.config import ManifestConfig
from pipeline.manifest import Manifest, ManifestError, ShardPlanner
from pipeline.plan_convert import convert_file


def plans(path, **cfg):
    """The manifest and its shard plans of 2 rows, each read as a shard task reads it. CSV and
    JSONL are converted here, as the job's Ray tasks (`Manifest.convert`) would."""
    manifest = Manifest(str(path), "videos", ManifestConfig(**cfg), {}, plan_root=str(path.parent / "_plan"))
    if manifest.format != "parquet":
        manifest.file_records()  # where each conversion goes
        for f in manifest.files:
            convert_file(manifest.format, f, manifest.read_urls[f], {}, 1000, manifest.source_column)
        manifest._records = None  # read the conversions' footers
    return manifest, [p.materialize() for p in ShardPlanner(manifest, 2).run()]


@pytest.mark.parametrize(("text", "seconds"), [
    (3, 3.0), (2.5, 2.5), ("12.25", 12.25), ("0:00:05.005", 5.005), ("1:02:03.5", 3723.5),
    ("00:01:30.000", 90.0), ("01:30", 90.0), ("0:00:01,250", 1.25),
])
def test_parse_time(text, seconds):
    assert parse_time(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["", "abc", "1:2:3:4", None, True, float("inf"), [1, 2]])
def test_parse_time_refuses(bad):
    with pytest.raises(ValueError):
        parse_time(bad)


def test_lists_parse_as_literals_never_code():
    assert parse_list("[['0:00:00.000', '0:00:05.000'], ['0:00:06.000', '0:00:09.500']]") == [
        ["0:00:00.000", "0:00:05.000"], ["0:00:06.000", "0:00:09.500"]]
    assert parse_spans([[0, 5], ("6", "9.5")]) == [(0.0, 5.0), (6.0, 9.5)]
    assert parse_spans([{"span": ["0:00:01.0", "0:00:02.0"], "clip_id": "a"}]) == [(1.0, 2.0)]  # HD-VILA
    for hostile in ("__import__('os').system('touch /tmp/x')", "[open('/etc/passwd')]", "[1, 2"):
        with pytest.raises(ValueError):
            parse_list(hostile)
    for bad in ("[[1, 2, 3]]", "[5]", "[['a', 'b']]", "7"):
        with pytest.raises(ValueError):
            parse_spans(bad)


def test_row_clips():
    assert row_clips(None, "whole", 3) == [Clip(None, "whole")]  # no spans: today's one sample
    spans = [(0.0, 2.0), (3.0, 5.0)]
    assert row_clips(spans, ["a", "b"], 0) == [Clip(spans[0], "a"), Clip(spans[1], "b")]
    assert row_clips(spans, "['a', 'b']", 0) == [Clip(spans[0], "a"), Clip(spans[1], "b")]  # CSV list
    assert row_clips(spans, "one for all", 0) == [Clip(s, "one for all") for s in spans]
    assert row_clips(spans[:1], "[Music] a man sings", 0) == [Clip(spans[0], "[Music] a man sings")]
    with pytest.raises(RowError) as err:
        row_clips(spans, ["a", "b", "c"], 7)
    assert err.value.reason == "bad_caption" and "manifest row 7" in err.value.detail
    with pytest.raises(RowError) as err:
        row_clips([], "x", 8)
    assert err.value.reason == "bad_span" and "manifest row 8" in err.value.detail
    with pytest.raises(RowError) as err:
        row_clips(spans, "not a list", 9, list_captions=True)
    assert err.value.reason == "bad_caption"


def test_keys():
    source = "/data/v.mp4"
    assert sample_key(source) == hashlib.sha1(source.encode()).hexdigest()[:24]  # old datasets' keys
    assert sample_key(source, (1.5, 3)) == sample_key(source, (parse_time("0:00:01.500"), 3.0))
    keys = {sample_key(source), sample_key(source, (0, 2)), sample_key(source, (2, 4)),
            sample_key("/o", (0, 2))}
    assert len(keys) == 4


def panda_rows(tmp_path):
    return [
        {"videoID": "a", "url": str(tmp_path / "a.mp4"),
         "timestamp": [["0:00:00.000", "0:00:02.500"], ["0:00:04.000", "0:00:06.000"]],
         "caption": ["first", "second"], "matching_score": [0.4, 0.5]},
        {"videoID": "b", "url": str(tmp_path / "b.mp4"), "timestamp": [["0:00:01.000", "0:00:03.000"]],
         "caption": ["third"], "matching_score": [0.3]},
    ]


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_panda70m_detected_from_its_columns(tmp_path, fmt):
    rows = panda_rows(tmp_path)
    if fmt == "csv":  # as shipped: Python-literal list strings
        frame = pd.DataFrame([{k: str(v) if isinstance(v, list) else v for k, v in r.items()}
                              for r in rows])
        frame.to_csv(tmp_path / "panda.csv", index=False)
    else:
        pd.DataFrame(rows).to_parquet(tmp_path / "panda.parquet", index=False)
    manifest, [plan] = plans(tmp_path / f"panda.{fmt}")
    assert manifest.clips.layout == "panda70m" and manifest.source_column == "url"
    assert manifest.extra_names == ["timestamp"]
    assert plan.sources == [r["url"] for r in rows]
    clips = [plan.clips.clips(plan.columns, i, i, plan.captions[i]) for i in range(2)]
    assert clips == [[Clip((0.0, 2.5), "first"), Clip((4.0, 6.0), "second")], [Clip((1.0, 3.0), "third")]]
    # Videos already downloaded: the template names them by videoID instead of the url column.
    _, [plan] = plans(tmp_path / f"panda.{fmt}", source_template="/data/panda/{videoID}.mp4")
    assert plan.sources == ["/data/panda/a.mp4", "/data/panda/b.mp4"]
    assert plan.clips.clips_column == "timestamp"


def test_internvid_jsonl_with_a_source_template(tmp_path):
    rows = [{"YoutubeID": vid, "Start_timestamp": start, "End_timestamp": end, "Caption": f"clip {i}",
             "Aesthetic_Score": 5.0, "UMT_Score": 0.4}
            for i, (vid, start, end) in enumerate([("abc", "00:00:01.000", "00:00:03.000"),
                                                   ("xyz", "00:00:00.500", "00:00:02.000"),
                                                   ("abc", "00:00:05.000", "00:00:07.250")])]
    (tmp_path / "iv.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ManifestError, match=r"InternVid.*manifest\.source_template"):
        plans(tmp_path / "iv.jsonl")
    template = str(tmp_path / "videos" / "{YoutubeID}.mp4")
    (tmp_path / "videos").mkdir()
    manifest, got = plans(tmp_path / "iv.jsonl", source_template=template)
    assert manifest.clips.layout == "internvid" and manifest.caption_column == "Caption"
    want = [str(tmp_path / "videos" / f"{r['YoutubeID']}.mp4") for r in rows]
    assert [s for p in got for s in p.sources] == want
    assert str(tmp_path / "videos") in manifest.roots  # the template's folder may be read
    plan = got[0]
    assert plan.clips.clips(plan.columns, 0, 0, plan.captions[0]) == [Clip((1.0, 3.0), "clip 0")]
    # Rows of one video are not duplicates of each other; the same clip twice is.
    same = [plan.clips.identity(p.sources[i], p.columns, i) for p in got for i in range(len(p.sources))]
    assert len(set(same)) == 3
    with pytest.raises(ManifestError) as err:
        plans(tmp_path / "iv.jsonl", source_template=str(tmp_path / "{video_id}.mp4"))
    text = str(err.value)
    assert "'video_id'" in text and "iv.jsonl" in text and "source_template" in text


def test_generic_columns(tmp_path):
    pd.DataFrame({"video": ["/v/a.mp4", "/v/b.mp4"], "caption": ["x", "y"],
                  "t0": ["1.5", "0:00:02"], "t1": [3, "0:00:04.5"]}).to_csv(tmp_path / "m.csv", index=False)
    manifest, [plan] = plans(tmp_path / "m.csv", start_column="t0", end_column="t1")
    assert manifest.clips.layout == "start_end" and manifest.extra_names == ["t0", "t1"]
    assert [plan.clips.spans(plan.columns, i, i) for i in range(2)] == [[(1.5, 3.0)], [(2.0, 4.5)]]
    pd.DataFrame({"video": ["/v/a.mp4"], "caption": [["p", "q"]],
                  "spans": [[[0, 1], [2, 3]]]}).to_parquet(tmp_path / "m.parquet", index=False)
    _, [plan] = plans(tmp_path / "m.parquet", clips_column="spans")
    clips = plan.clips.clips(plan.columns, 0, 0, plan.captions[0])
    assert clips == [Clip((0.0, 1.0), "p"), Clip((2.0, 3.0), "q")]
    with pytest.raises(ManifestError, match=r"no column 'begin' named by manifest\.start_column"):
        plans(tmp_path / "m.csv", start_column="begin", end_column="t1")
    pd.DataFrame({"video": ["/v/a.mp4"], "caption": ["x"], "spans": ["[[0, oops]]"]}).to_csv(
        tmp_path / "bad.csv", index=False)
    _, [plan] = plans(tmp_path / "bad.csv", clips_column="spans")
    with pytest.raises(RowError) as err:
        plan.clips.spans(plan.columns, 0, 0)
    assert err.value.reason == "bad_span"
    assert "manifest row 0" in err.value.detail and "'spans'" in err.value.detail


def test_plain_manifests_are_unchanged(tmp_path):
    pd.DataFrame({"video": ["/v/a.mp4"], "caption": ["x"]}).to_parquet(tmp_path / "m.parquet", index=False)
    manifest, [plan] = plans(tmp_path / "m.parquet")
    assert manifest.clips.layout == "plain" and manifest.extra_names == [] and not plan.clips.has_spans
    assert plan.clips.identity("/v/a.mp4", plan.columns, 0) == sample_key("/v/a.mp4")


@pytest.mark.parametrize(("fields", "words"), [
    ({"start_column": "a"}, "end_column"), ({"clips_column": "c", "start_column": "a", "end_column": "b"},
                                            "not both"),
    ({"source_template": "/data/{}.mp4"}, "column name"), ({"source_template": "/data/x.mp4"}, "no column"),
    ({"source_template": "/data/{id:>5}.mp4"}, "format spec"),
])
def test_config_refuses(fields, words):
    with pytest.raises(ConfigError, match=words):
        ManifestConfig(**fields)


def test_clip_settings_hash_only_when_set():
    """Old outputs keep their fingerprint (and resume); a clip setting changes the bytes, so it
    changes the fingerprint."""
    from core.config import load_config
    from pipeline.config import PrepConfig, output_config, prep_fingerprint

    plain = load_config(PrepConfig, None, [])
    assert not {"start_column", "clips_column", "source_template"} & set(output_config(plain)["manifest"])
    spans = load_config(PrepConfig, None, ["manifest.clips_column=spans"])
    assert output_config(spans)["manifest"]["clips_column"] == "spans"
    assert prep_fingerprint(spans) != prep_fingerprint(plain)
