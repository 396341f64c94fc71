"""Dataset report: numbers match hand-written status tables and shards; plots are real PNGs;
the latents payload is never read."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from core.shard_format import SampleRecord, sample_key
from pipeline import report
from pipeline.report_html import PLOTS

F = 8
LATENT_SHAPE = (F, 4, 8, 16)


def _video_record(i: int, rng: np.random.Generator) -> SampleRecord:
    source = f"/data/clip{i}.mp4"
    motion = rng.uniform(1.0, 5.0, F - 1).astype(np.float32)
    g = rng.normal(size=(F, 16))
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    fps = 24.0 + i
    indices = [3 * k for k in range(F)]
    return SampleRecord(
        key=sample_key(source), caption=f"clip {i}", latents=rng.normal(size=LATENT_SHAPE),
        meta={"source": source, "frame_indices": indices, "native_fps": fps, "stride": 3},
        motion=motion, appearance=(g @ g.T).astype(np.float32),
    )


def _write_shard(root: Path, kind: str, index: int, ok: list[SampleRecord], failed: list[tuple[str, str]],
                 commit: bool = True) -> None:
    """One shard as in docs/shard-format.md: tar, status parquet, and (if committed) the stats json."""
    d = root / kind
    d.mkdir(parents=True, exist_ok=True)
    name = f"{index:06d}"
    with tarfile.open(d / f"{name}.tar", "w") as tar:
        for rec in ok:
            for member, data in rec.members():
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    rows = [dict(key=r.key, source=r.meta["source"], caption=r.caption, status="ok", reason=None, detail=None)
            for r in ok]
    rows += [dict(key=sample_key(src), source=src, caption="x", status="failed", reason=reason,
                  detail=f"{reason}: {src}") for src, reason in failed]
    pd.DataFrame(rows).to_parquet(d / f"{name}.parquet")
    if commit:
        stats = {"ok": len(ok), "failed": len(failed)}
        (d / f"{name}.json").write_text(json.dumps(stats))


@pytest.fixture
def prep_out(tmp_path: Path) -> tuple[Path, list[SampleRecord]]:
    rng = np.random.default_rng(0)
    recs = [_video_record(i, rng) for i in range(6)]
    out = tmp_path / "out"
    failed = [("/data/bad0.mp4", "decode_error"), ("/data/s.mp4", "too_short")]
    _write_shard(out, "videos", 0, recs[:4], failed)
    _write_shard(out, "videos", 1, recs[4:], [("/data/bad1.mp4", "decode_error")])
    _write_shard(out, "videos", 2, [_video_record(9, rng)], [("/data/t.mp4", "timeout")], commit=False)
    img = SampleRecord(key=sample_key("/data/a.png"), caption="a", latents=rng.normal(size=(4, 8, 16)),
                       meta={"source": "/data/a.png"})
    _write_shard(out, "images", 0, [img], [("/data/b.png", "bad_image")])
    (out / "dataset.json").write_text(json.dumps({"fingerprint": "abc", "totals": {"ok": 7}}))
    return out, recs


def test_report_numbers_match_status_tables(prep_out, tmp_path):
    out, recs = prep_out
    report_dir = tmp_path / "rep"
    assert report.main([str(out), "--out", str(report_dir), "--workers", "2"]) == 0

    summary = json.loads((report_dir / "summary.json").read_text())["kinds"]
    # Independent count from the committed shards' status parquet files.
    committed = [p for p in (out / "videos").glob("*.parquet") if p.with_suffix(".json").exists()]
    status = pd.concat([pd.read_parquet(p) for p in committed])
    v = summary["videos"]
    assert v["rows"] == len(status)
    assert v["status"] == status["status"].value_counts().to_dict()
    assert v["reasons"] == status[status.status == "failed"]["reason"].value_counts().to_dict()
    assert v["samples_in_tars"] == (status.status == "ok").sum() == len(recs)
    assert v["incomplete_shards"] == ["000002"]
    assert summary["images"]["status"] == {"failed": 1, "ok": 1}
    assert summary["images"]["reasons"] == {"bad_image": 1}

    mean_motion = np.array([r.motion.mean() for r in recs])
    gamma_a = np.array([1.0 - r.appearance[0, -1] for r in recs])
    assert v["motion_mean_per_clip"]["mean"] == pytest.approx(mean_motion.mean(), rel=1e-5)
    assert v["appearance_factor"]["max"] == pytest.approx(gamma_a.max(), rel=1e-5)
    assert v["motion_raw"]["max"] == pytest.approx(max(r.motion.max() for r in recs), rel=1e-6)
    assert v["pearson_motion_appearance"] == pytest.approx(np.corrcoef(mean_motion, gamma_a)[0, 1], rel=1e-5)
    assert v["frames"]["min"] == v["frames"]["max"] == F
    spans = [(r.meta["frame_indices"][-1] + 1) / r.meta["native_fps"] for r in recs]
    assert v["span_seconds"]["mean"] == pytest.approx(np.mean(spans))

    for name in PLOTS:
        with Image.open(report_dir / name) as im:
            im.load()
            assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
    page = (report_dir / "index.html").read_text()
    md = (report_dir / "report.md").read_text()
    for text in (page, md):
        assert "decode_error" in text and "scatter.png" in text and "000002" in text
    assert "| videos | 2 | 1 | 9 | 6 | 3 | 6 |" in md


class CountingFile(io.RawIOBase):
    """A seekable file that counts the bytes actually read from it."""

    def __init__(self, data: bytes):
        self._f = io.BytesIO(data)
        self.bytes_read = 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, pos, whence=0):
        return self._f.seek(pos, whence)

    def tell(self):
        return self._f.tell()

    def read(self, n=-1):
        data = self._f.read(n)
        self.bytes_read += len(data)
        return data

    def readinto(self, b):
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


def test_latents_payload_is_skipped(prep_out):
    out, recs = prep_out
    data = (out / "videos" / "000000.tar").read_bytes()
    f = CountingFile(data)
    samples = list(report.iter_small_members(f))
    assert [k for k, _ in samples] == [r.key for r in recs[:4]]
    assert set(samples[0][1]) == {"json", "motion.npy", "appearance.npy"}
    latents_bytes = sum(len(d) for r in recs[:4] for n, d in r.members() if n.endswith(".latents.npy"))
    assert latents_bytes > len(data) // 2  # the test is meaningful only if latents dominate
    assert f.bytes_read < len(data) - latents_bytes


def test_report_from_s3(prep_out, tmp_path, moto_s3):
    import fsspec

    opts = moto_s3.options()
    fs = fsspec.filesystem("s3", **opts)
    fs.mkdir("bucket")
    fs.put(str(prep_out[0]), "bucket/prep", recursive=True)
    fsspec.config.conf["s3"] = opts
    try:
        index = report.write_report("s3://bucket/prep", str(tmp_path / "rep"), workers=2)
    finally:
        fsspec.config.conf.pop("s3", None)
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())["kinds"]
    assert index.endswith("index.html")
    assert summary["videos"]["status"] == {"failed": 3, "ok": 6}
    assert summary["videos"]["clips_with_factors"] == 6


def test_bad_input(tmp_path, capsys):
    assert report.main([str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert report.main([str(tmp_path / "empty")]) == 2
    assert "no shards" in capsys.readouterr().err


def test_corrupt_member_is_counted_not_fatal(tmp_path):
    rng = np.random.default_rng(1)
    rec = _video_record(0, rng)
    bad = _video_record(1, rng)
    out = tmp_path / "out"
    _write_shard(out, "videos", 0, [rec, bad], [])
    # Corrupt one sample's motion member in place (same length, so the tar stays valid).
    tar_path = out / "videos" / "000000.tar"
    raw = bytearray(tar_path.read_bytes())
    good = dict(bad.members())[f"{bad.key}.motion.npy"]
    at = raw.find(good)
    raw[at: at + 6] = b"XXXXXX"
    tar_path.write_bytes(bytes(raw))
    reports, _ = report.collect(str(out), workers=1)
    assert reports["videos"].samples == 2
    assert sum(reports["videos"].unreadable.values()) == 1
    assert len(reports["videos"].motion_mean) == 1
