"""The data statistics of dataset.json (core/statistics.py, pipeline/statistics.py): per-clip
factors collected as shards are written, percentiles at finalize, and reading them back."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest

from core.shard_format import SampleRecord, load_npy
from core.statistics import (
    MOTION_UNITS,
    PERCENTILES,
    DataStatistics,
    StatisticsError,
    read_dataset_statistics,
)
from pipeline.statistics import FactorLog, dataset_statistics


def _clip(key: str, motion: list[float], similarity_last: float, frames: int = 4) -> SampleRecord:
    appearance = np.ones((frames, frames), np.float32)
    appearance[0, -1] = appearance[-1, 0] = similarity_last
    return SampleRecord(key, "c", np.zeros((frames, 4, 2, 3), np.float16), {},
                        motion=np.asarray(motion, np.float32), appearance=appearance)


def _shard(name: str, clips: list[SampleRecord]) -> dict:
    log = FactorLog()
    for clip in clips:
        log.add(clip.members())
    log.add(SampleRecord("img", "c", np.zeros((4, 2, 3), np.float16), {}).members())  # no factors
    return {"shard": name, "ok": len(clips), "factors": log.to_dict()}


def test_factor_log_and_percentiles():
    a = _shard("000000", [_clip("a", [1.0, 2.0, 3.0], 0.9), _clip("b", [0.0, 0.0, 0.3], 0.5)])
    b = _shard("000001", [_clip("c", [4.0, 4.0, 4.0], 1.0)])
    assert a["factors"]["motion_mean"] == pytest.approx([2.0, 0.1])
    assert a["factors"]["appearance_change"] == pytest.approx([0.1, 0.5])
    assert a["factors"]["latent_shape"] == [4, 4, 2, 3]
    stats, why = dataset_statistics([a, b, {"shard": "000002", "ok": 0}], width=24, height=16)
    assert why == ""
    got = DataStatistics.from_dict(json.loads(json.dumps(stats)))
    assert (got.clips, got.frames, got.width, got.height, got.latent_size) == (3, 4, 24, 16, (2, 3))
    expected = np.percentile(MOTION_UNITS * np.array([2.0, 0.1, 4.0]), PERCENTILES)
    assert [got.motion[f"p{p}"] for p in PERCENTILES] == pytest.approx(expected, rel=1e-5)
    assert got.motion["p50"] == pytest.approx(20.0)  # γm units: 10 x the raw factor
    assert got.appearance_change["p50"] == pytest.approx(0.1, rel=1e-5)


def test_unusable_factors_are_counted_not_fatal():
    log = FactorLog()
    log.add(_clip("a", [1.0, float("nan"), 3.0], 0.9).members())
    log.add([("b.motion.npy", b"not npy"), ("b.appearance.npy", b"x")])
    log.add(_clip("c", [1.0, 1.0, 1.0], 0.5).members())
    assert log.to_dict()["skipped"] == 2 and log.to_dict()["motion_mean"] == [1.0]


def test_statistics_need_every_shard_to_carry_factors():
    a = _shard("000000", [_clip("a", [1.0, 2.0, 3.0], 0.9)])
    stats, why = dataset_statistics([a, {"shard": "000001", "ok": 3}], width=24, height=16)
    assert stats is None and "000001" in why and "--overwrite" in why
    other = _shard("000002", [_clip("z", [1.0] * 5, 0.9, frames=6)])
    stats, why = dataset_statistics([a, other], width=24, height=16)
    assert stats is None and "latent shape" in why


def test_read_back_and_bad_sections_name_the_field(tmp_path):
    assert read_dataset_statistics(str(tmp_path))[0] is None
    (tmp_path / "dataset.json").write_text(json.dumps({"statistics": None, "statistics_note": "x"}))
    stats, why = read_dataset_statistics(str(tmp_path))
    assert stats is None and "older prep" in why
    good, _ = dataset_statistics([_shard("000000", [_clip("a", [1.0, 2.0, 3.0], 0.9)])], 24, 16)
    (tmp_path / "dataset.json").write_text(json.dumps({"statistics": good}))
    assert read_dataset_statistics(str(tmp_path))[0].to_dict() == good
    bad = dict(good, motion={"p1": 1.0})
    with pytest.raises(StatisticsError, match=r"statistics.motion: needs numbers .*'p10'"):
        DataStatistics.from_dict(bad)
    with pytest.raises(StatisticsError, match="statistics.latent_size"):
        DataStatistics.from_dict(dict(good, latent_size=[8]))


@pytest.mark.slow
def test_prep_writes_statistics_of_its_clips(synthetic, ray_session, prep, tmp_path):
    """End to end: dataset.json's percentiles are those of the factors inside the tars."""
    out = tmp_path / "out"
    assert prep("--videos", str(synthetic / "ten.parquet"), "--out", str(out)) == 0
    doc = json.loads((out / "dataset.json").read_text())
    stats = DataStatistics.from_dict(doc["statistics"])
    motion, change, shapes = [], [], set()
    for path in sorted((out / "videos").glob("*.tar")):
        with tarfile.open(path) as tar:
            for info in tar:
                data = tar.extractfile(info).read()
                if info.name.endswith(".motion.npy"):
                    motion.append(float(load_npy(data).mean()))
                elif info.name.endswith(".appearance.npy"):
                    change.append(float(1 - load_npy(data)[0, -1]))
                elif info.name.endswith(".latents.npy"):
                    shapes.add(load_npy(data).shape)
    assert stats.clips == len(motion) == 9  # the corrupt row has no clip
    assert shapes == {(stats.frames, 4, *stats.latent_size)} and (stats.width, stats.height) == (128, 64)
    expected = np.percentile(MOTION_UNITS * np.array(motion), PERCENTILES)
    assert [stats.motion[f"p{p}"] for p in PERCENTILES] == pytest.approx(expected, rel=1e-4)
    expected = np.percentile(change, PERCENTILES)
    got = [stats.appearance_change[f"p{p}"] for p in PERCENTILES]
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-6)


def _big_shards(n_shards: int = 40, clips: int = 500) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"shard": f"{i:06d}", "ok": clips,
             "factors": {"motion_mean": rng.lognormal(-1.0, 1.0, clips).tolist(),
                         "appearance_change": rng.uniform(0.0, 0.6, clips).tolist(),
                         "latent_shape": [4, 4, 2, 3], "skipped": 0}} for i in range(n_shards)]


def test_past_the_exact_limit_the_driver_bins_and_stays_close():
    # 20k clips; with exact_clips=1000 the driver keeps histograms (O(bins), not O(clips)).
    shards = _big_shards()
    exact, _ = dataset_statistics(shards, 24, 16)
    binned, why = dataset_statistics(shards, 24, 16, exact_clips=1000)
    assert why == "" and binned["clips"] == exact["clips"] == 20_000
    for p in PERCENTILES:
        assert binned["motion"][f"p{p}"] == pytest.approx(exact["motion"][f"p{p}"], rel=5e-3)
        assert binned["appearance_change"][f"p{p}"] == pytest.approx(
            exact["appearance_change"][f"p{p}"], abs=5e-4)
    # Order-independent: shards finish in any order, dataset.json says the same.
    assert dataset_statistics(shards[::-1], 24, 16, exact_clips=1000)[0] == binned


def test_the_run_summary_keeps_no_per_clip_lists():
    from pipeline.summary import KindStats

    stats = KindStats()
    for shard in _big_shards(3, 10):
        stats.add_done(shard)
    assert all("motion_mean" not in s["factors"] for s in stats.shard_stats.values())
    assert stats.factor_stats.result(24, 16)[0] == dataset_statistics(_big_shards(3, 10), 24, 16)[0]
