"""Filters without decoding: the `filter.*` checks on crafted sizes, durations and motion
factors, the fingerprint staying put while they are off, and `manifest.filter` /
`manifest.extra_columns` checked when a manifest opens (errors name the file and column)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from core.config import ConfigError, load_config
from core.shard_format import REASONS, SampleError
from pipeline.config import PrepConfig, prep_fingerprint
from pipeline.filters import RowFilter
from pipeline.manifest import Manifest, ManifestError
from pipeline.plan import ShardPlanner
from preprocessing.filters import FilterConfig, motion_failure, source_failure
from preprocessing.image import load_image
from preprocessing.settings import ImageConfig

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "prep" / "tiny.yaml")
LIMITS = FilterConfig(min_short_side=64, max_aspect=3.0, min_duration_s=0.5,
                      max_duration_s=4.0).source_request()


def test_reason_codes_are_registered():
    for code in ("filtered", "too_small", "bad_aspect", "bad_duration", "static", "scene_cut"):
        assert code in REASONS


@pytest.mark.parametrize(
    "size, duration, reason",
    [
        ((128, 96), 1.0, None),
        ((48, 32), 1.0, "too_small"),
        ((384, 64), 1.0, "bad_aspect"),
        ((64, 384), 1.0, "bad_aspect"),  # portrait too
        ((128, 96), 0.25, "bad_duration"),
        ((128, 96), 8.0, "bad_duration"),
        ((128, 96), None, None),  # unknown duration passes
    ],
)
def test_source_filters(size, duration, reason):
    failure = source_failure(LIMITS, *size, duration)
    assert (failure[0] if failure else None) == reason
    if failure:
        assert "filter." in failure[1]


def test_filters_off_by_default_pass_everything():
    cfg = FilterConfig()
    assert cfg.source_request() is None
    assert source_failure(cfg.source_request(), 1, 1000, 1e6) is None
    assert motion_failure(cfg, np.zeros(7, np.float32)) is None


def test_motion_filters():
    cfg = FilterConfig(min_motion=0.1, max_motion_jump=1.5)
    normal = np.array([0.53, 0.60, 0.57, 0.67, 0.53, 0.66, 0.59], np.float32)
    assert motion_failure(cfg, normal) is None
    still = np.array([0.04, 0, 0, 0, 0, 0, 0], np.float32)
    assert motion_failure(cfg, still)[0] == "static"
    cut = normal.copy()
    cut[3] = 1.2  # > 1.5 x median 0.59
    reason, detail = motion_failure(cfg, cut)
    assert reason == "scene_cut" and "frame pair 3->4" in detail
    # each filter alone: the static clip is not a cut when only min_motion is on, and vice versa
    assert motion_failure(FilterConfig(min_motion=0.1), cut) is None
    assert motion_failure(FilterConfig(max_motion_jump=1.5), normal) is None


@pytest.mark.parametrize(
    "override, field",
    [
        ("filter.max_aspect=0.5", "filter.max_aspect"),
        ("filter.min_short_side=-1", "filter.min_short_side"),
        ("filter.max_duration_s=1", "filter.max_duration_s"),  # below min_duration_s=2
        ("filter.max_motion_jump=1", "filter.max_motion_jump"),
        ("manifest.extra_columns=[width]", "manifest.extra_columns"),  # a status column
        ("video.split=shots", "video.split"),
        ("video.max_clip_s=1", "video.max_clip_s"),  # below min_clip_s=2
    ],
)
def test_bad_filter_config_names_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(PrepConfig, TINY, ["filter.min_duration_s=2", "video.min_clip_s=2", override])


def test_fingerprint_unchanged_while_filters_are_off():
    base = load_config(PrepConfig, TINY)
    explicit = load_config(PrepConfig, TINY, ["filter.min_motion=0", "manifest.extra_columns=[]"])
    assert prep_fingerprint(explicit) == prep_fingerprint(base)
    changed = ("filter.min_motion=0.2", "manifest.filter=punsafe < 0.5", "manifest.extra_columns=[x]",
               "video.split=scenes", "video.max_clip_s=10")
    for override in changed:
        assert prep_fingerprint(load_config(PrepConfig, TINY, [override])) != prep_fingerprint(base)


def test_added_fields_stay_out_of_the_fingerprint_at_their_defaults():
    from pipeline.config import SINCE_ADDED, output_config

    data = output_config(PrepConfig())
    for section, fields in SINCE_ADDED.items():
        if fields is None:
            assert section not in data
        else:
            assert not set(fields) & set(data[section])
    assert "dedupe" in output_config(load_config(PrepConfig, TINY, ["dedupe=none"]))


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (90, 30, 200)).save(buf, format="PNG")
    return buf.getvalue()


def test_image_size_filters_on_the_header():
    cfg = ImageConfig(width=32, height=16)
    load_image("ok.png", _png(128, 96), cfg, LIMITS)
    for size, reason in (((40, 30), "too_small"), ((400, 70), "bad_aspect")):
        with pytest.raises(SampleError) as err:
            load_image("x.png", _png(*size), cfg, LIMITS)
        assert err.value.reason == reason and "x.png" in err.value.detail


# -- manifest.filter / manifest.extra_columns at open ---------------------------------------------

@pytest.fixture
def laion(tmp_path: Path) -> Path:
    rows = [
        dict(URL=f"img{i}.png", TEXT=f"a picture {i}", punsafe=p, WIDTH=w, similarity=s, hash=f"h{i}")
        for i, (p, w, s) in enumerate([(0.1, 512, 0.3), (0.9, 512, 0.3), (0.1, 128, 0.3), (0.1, 512, 0.2),
                                       (None, 512, 0.3), (0.2, 300, 0.35)])
    ]
    path = tmp_path / "laion.parquet"
    pd.DataFrame(rows).to_parquet(path, index=False)
    return path


def _manifest(path: Path, *overrides: str) -> Manifest:
    cfg = load_config(PrepConfig, TINY, list(overrides))
    return Manifest(str(path), "images", cfg.manifest, {})


EXPR = "manifest.filter=punsafe < 0.5 and WIDTH >= 256 and similarity > 0.28"


def test_filter_columns_are_read_for_the_shard_tasks(laion):
    m = _manifest(laion, EXPR, "manifest.extra_columns=[similarity, hash]")
    assert m.extra_names == ["similarity", "hash", "punsafe", "WIDTH"]
    plan = next(ShardPlanner(m, 10).run()).materialize()
    row_filter = RowFilter("punsafe < 0.5 and WIDTH >= 256 and similarity > 0.28")
    mapping = row_filter.resolve(list(plan.columns), str(laion))
    # row 1 unsafe, 2 too narrow, 3 dissimilar, 4 punsafe NULL (SQL: not true -> rejected)
    assert row_filter.keep(plan.columns, mapping, 6) == [True, False, False, False, False, True]


@pytest.mark.parametrize(
    "override, words",
    [
        ("manifest.filter=punsafe <", ["does not parse"]),
        ("manifest.filter=nsfw = 'UNLIKELY'", ["laion.parquet", "'nsfw'"]),
        ("manifest.filter=TEXT > 5 and TEXT like 'a%'", ["laion.parquet", "cannot be evaluated"]),
        ("manifest.filter=1); DROP TABLE t; SELECT (1", ["manifest.filter"]),
        ("manifest.extra_columns=[aesthetic_score]", ["laion.parquet", "'aesthetic_score'", "extra_columns"]),
    ],
)
def test_manifest_level_errors_name_file_and_column(laion, override, words):
    with pytest.raises(ManifestError) as err:
        _manifest(laion, override)
    for word in words:
        assert word in str(err.value)


def test_csv_columns_compared_with_numbers_are_numbers(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("URL,TEXT,punsafe,tag\na.png,x,0.1,cat\nb.png,y,0.9,cat\nc.png,z,oops,dog\n")
    m = _manifest(path, "manifest.filter=punsafe < 0.5 and tag = 'cat'")  # binds on the text values
    assert m.extra_names == ["punsafe", "tag"]
    # a task reads CSV values as text (the parquet conversion keeps them strings)
    columns = {"punsafe": ["0.1", "0.9", "oops"], "tag": ["cat", "cat", "dog"]}
    row_filter = RowFilter(m.cfg.filter)
    keep = row_filter.keep(columns, row_filter.resolve(list(columns), "m.csv"), 3)
    assert keep == [True, False, False]  # `oops` is not a number: NULL, rejected
    mixed = RowFilter("PUNSAFE IS NOT NULL AND punsafe < 0.5")  # one column, either spelling
    assert mixed.keep(columns, mixed.resolve(list(columns), "m.csv"), 3) == [True, False, False]


def test_every_parquet_file_is_checked(tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    pd.DataFrame([dict(URL="a.png", TEXT="x", punsafe=0.1)]).to_parquet(folder / "0.parquet")
    pd.DataFrame([dict(URL="b.png", TEXT="y")]).to_parquet(folder / "1.parquet")
    with pytest.raises(ManifestError) as err:
        _manifest(folder, "manifest.filter=PUNSAFE < 0.5")
    assert "1.parquet" in str(err.value) and "'PUNSAFE'" in str(err.value)
    assert RowFilter("WIDTH > 1 and width < 9").names == ["WIDTH"]  # one column, as in DuckDB
