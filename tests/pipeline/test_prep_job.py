"""The preprocessing job end to end on synthetic media with tiny models, on the session's
2-CPU Ray instance: layout and accounting, bad input, resume, determinism, fingerprint,
--retry-failed, duplicates, encoder actors, and reading the shards back with stock tools."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.slow

KINDS = ("videos", "images")


def status(out: Path, kind: str) -> pd.DataFrame:
    files = sorted((out / kind).glob("*.parquet"))
    return pd.concat([pd.read_parquet(f).assign(shard=f.stem) for f in files], ignore_index=True)


def tar_bytes(out: Path) -> dict[str, bytes]:
    return {f"{k}/{p.name}": p.read_bytes() for k in KINDS for p in sorted((out / k).glob("*.tar"))}


def with_roots(prep, *folders: Path):
    """`prep` allowed to read media from `folders` (by default only the manifest's own folder)."""
    roots = "manifest.allowed_roots=[" + ",".join(str(f) for f in folders) + "]"
    return lambda *argv: prep(*argv, roots)


@pytest.fixture(scope="module")
def first_run(synthetic, ray_session, tmp_path_factory):
    """10 videos (one corrupt) and the generator's 10 images (4 broken), 4 rows per shard."""
    from pipeline.prep import main

    out = tmp_path_factory.mktemp("run") / "out"
    args = [
        "--videos",
        str(synthetic / "ten.parquet"),
        "--images",
        str(synthetic / "images.jsonl"),
        "--out",
        str(out),
        "--config",
        str(Path(__file__).parents[2] / "configs/prep/tiny.yaml"),
        "execution.progress=false",
    ]
    assert main(args) == 0
    return out, args


def test_layout_and_every_row_accounted_for(first_run, synthetic):
    out, _ = first_run
    names = sorted(p.name for p in (out / "videos").iterdir())
    assert names == [f"00000{i}.{ext}" for i in range(3) for ext in ("json", "parquet", "tar")]
    assert not (out / "_tmp").exists()
    videos = status(out, "videos")
    manifest = pd.read_parquet(synthetic / "ten.parquet")
    assert videos.source.tolist() == manifest.video.tolist()  # every row once, in order
    assert videos.shard.tolist() == ["000000"] * 4 + ["000001"] * 4 + ["000002"] * 2
    assert (videos.status == "ok").sum() == 9
    bad = videos[videos.status == "failed"]
    assert bad.source.tolist() == [str(synthetic / "bad" / "random_bytes.mp4")]
    assert bad.reason.tolist() == ["decode_error"] and "random_bytes.mp4" in bad.detail.iloc[0]
    images = status(out, "images")
    expected = json.loads((synthetic / "expected_failures.json").read_text())
    assert len(images) == 10 and (images.status == "ok").sum() == 6
    for row in images[images.status == "failed"].itertuples():
        assert row.reason == expected[row.source]
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["complete"] and dataset["format_version"] == 1
    assert dataset["totals"]["videos"]["ok"] == 9 and dataset["totals"]["images"]["rows"] == 10
    assert dataset["model_ids"]["vae"] == "tiny" and len(dataset["fingerprint"]) == 16
    stats = json.loads((out / "videos" / "000001.json").read_text())
    assert stats["rows"] == 4 and stats["ok"] == 3 and stats["reasons"] == {"decode_error": 1}
    index = pd.read_parquet(out / "index.parquet")
    assert index[index.kind == "videos"][["shard", "ok", "failed"]].values.tolist() == [[0, 4, 0], [1, 3, 1],
                                                                                        [2, 2, 0]]
    assert index[index.kind == "images"].ok.sum() == 6 and len(index[index.kind == "images"]) == 3
    tar_sizes = [(out / "videos" / f"00000{i}.tar").stat().st_size for i in range(3)]
    assert index[index.kind == "videos"].tar_bytes.tolist() == tar_sizes


def test_read_back_with_stock_webdataset(first_run):
    import webdataset as wds

    out, _ = first_run
    ok = status(out, "videos").query("status == 'ok'")
    urls = [str(p) for p in sorted((out / "videos").glob("*.tar"))]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in samples] == ok.key.tolist()
    for s in samples:
        latents = np.load(io.BytesIO(s["latents.npy"]), allow_pickle=False)
        motion = np.load(io.BytesIO(s["motion.npy"]), allow_pickle=False)
        appearance = np.load(io.BytesIO(s["appearance.npy"]), allow_pickle=False)
        assert latents.dtype == np.float16 and latents.shape == (8, 4, 8, 16)
        assert motion.dtype == np.float32 and motion.shape == (7,)
        assert appearance.shape == (8, 8) and np.allclose(np.diag(appearance), 1, atol=1e-3)
        meta = json.loads(s["json"])
        assert meta["format_version"] == 1 and meta["source"] == ok.set_index("key").source[s["__key__"]]
        assert s["txt"].decode() == ok.set_index("key").caption[s["__key__"]]


def test_read_back_with_ray_data(first_run, ray_session):
    import ray.data

    out, _ = first_run
    tars = [str(p) for p in sorted((out / "images").glob("*.tar"))]
    rows = ray.data.read_webdataset(tars, decoder=None).take_all()
    assert sorted(r["__key__"] for r in rows) == sorted(status(out, "images").query("status == 'ok'").key)
    for r in rows:
        latents = np.load(io.BytesIO(r["latents.npy"]), allow_pickle=False)
        assert latents.shape == (4, 8, 16) and "motion.npy" not in r


def test_resume_skips_committed_and_redoes_uncommitted(first_run, prep, tmp_path):
    out0, args = first_run
    out = tmp_path / "out"
    shutil.copytree(out0, out)
    before = tar_bytes(out)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.tar")}
    (out / "videos" / "000001.json").unlink()
    (out / "images" / "000002.tar").write_bytes(b"partial")  # a crash after the tar, before the json
    (out / "images" / "000002.json").unlink()
    rerun = [a if a != str(out0) else str(out) for a in args]
    from pipeline.prep import main

    assert main(rerun) == 0
    redone = {p for p, t in mtimes.items() if p.stat().st_mtime_ns != t}
    assert redone == {out / "videos" / "000001.tar", out / "images" / "000002.tar"}
    assert tar_bytes(out) == before  # redone shards are byte-identical
    assert (out / "videos" / "000001.json").exists()


def test_identical_inputs_give_identical_tars(first_run, tmp_path):
    from pipeline.prep import main

    out0, args = first_run
    assert main([a if a != str(out0) else str(tmp_path / "again") for a in args]) == 0
    assert tar_bytes(tmp_path / "again") == tar_bytes(out0)


def test_fingerprint_mismatch_needs_overwrite(synthetic, prep, tmp_path, capsys):
    images = str(synthetic / "good_images.parquet")
    out = str(tmp_path / "out")
    assert prep("--images", images, "--out", out) == 0
    assert prep("--images", images, "--out", out, "image.width=64") == 2
    assert "different config" in capsys.readouterr().err
    assert prep("--images", images, "--out", out, "image.width=64", "--overwrite") == 0
    assert json.loads((tmp_path / "out" / "dataset.json").read_text())["config"]["image"]["width"] == 64
    latents = status(tmp_path / "out", "images")
    assert (latents.status == "ok").all()


def test_retry_failed_redoes_only_failed_rows(synthetic, prep, tmp_path):
    good = pd.read_parquet(synthetic / "good_images.parquet")[:3]
    late = tmp_path / "late.png"
    rows = pd.concat([good[:1], pd.DataFrame([{"image": str(late), "caption": "arrives late"}]), good[1:]])
    rows.to_parquet(tmp_path / "m.parquet", index=False)
    out = tmp_path / "out"
    prep = with_roots(prep, synthetic, tmp_path)  # the media live outside the manifest's folder
    assert prep("--images", str(tmp_path / "m.parquet"), "--out", str(out)) == 0
    assert status(out, "images").reason.tolist()[1] == "missing_file"
    first = tar_bytes(out)
    shutil.copy(good.image.iloc[0], late)
    mtime = (out / "images" / "000000.tar").stat().st_mtime_ns
    assert prep("--images", str(tmp_path / "m.parquet"), "--out", str(out)) == 0  # plain rerun: skipped
    assert (out / "images" / "000000.tar").stat().st_mtime_ns == mtime
    # A missing file is a permanent failure: plain --retry-failed (transient ones) keeps it as it is.
    assert prep("--images", str(tmp_path / "m.parquet"), "--out", str(out), "--retry-failed") == 0
    assert status(out, "images").reason.tolist()[1] == "missing_file"
    assert tar_bytes(out) == first
    assert prep("--images", str(tmp_path / "m.parquet"), "--out", str(out), "--retry-failed=all") == 0
    assert status(out, "images").status.tolist() == ["ok"] * 4
    assert tar_bytes(out)["images/000000.tar"] != first["images/000000.tar"]
    assert prep("--images", str(tmp_path / "m.parquet"), "--out", str(tmp_path / "fresh")) == 0
    assert tar_bytes(out) == tar_bytes(tmp_path / "fresh")  # as if it had worked the first time
    assert json.loads((out / "images" / "000000.json").read_text())["retried"] is True


def test_duplicate_sources_fail_with_reason(synthetic, prep, tmp_path):
    good = pd.read_parquet(synthetic / "good_images.parquet")
    rows = pd.concat([good[:2], good[:1], good[2:3], good[:1]])  # shards of 4: [a b a c] [a]
    rows.to_parquet(tmp_path / "m.parquet", index=False)
    out = tmp_path / "out"
    prep = with_roots(prep, synthetic)
    assert prep("--images", str(tmp_path / "m.parquet"), "--out", str(out)) == 0
    table = status(out, "images")
    # The repeat in shard 1 fails too: a key appears once in the whole dataset.
    assert table.status.tolist() == ["ok", "ok", "failed", "ok", "failed"]
    assert table.reason[2] == table.reason[4] == "duplicate"
    assert "manifest row 0" in table.detail[2] and "manifest row 0" in table.detail[4]
    keys = []
    for shard in ("000000", "000001"):
        with tarfile.open(out / "images" / f"{shard}.tar") as tar:
            keys += [m.name.split(".", 1)[0] for m in tar.getmembers() if m.name.endswith(".txt")]
    assert len(keys) == len(set(keys)) == 3
    # A rerun that resumes (shard 0 committed, shard 1 redone) decides the same way.
    (out / "images" / "000001.json").unlink()
    assert prep("--images", str(tmp_path / "m.parquet"), "--out", str(out)) == 0
    assert status(out, "images").status.tolist() == ["ok", "ok", "failed", "ok", "failed"]


def test_encoder_actors_give_the_same_shards(first_run, synthetic, prep, tmp_path):
    """CPU encoder actors (the GPU design, with gpus_per_encoder=0) write the same bytes."""
    out0, _ = first_run
    out = tmp_path / "out"
    assert (
        prep(
            "--videos",
            str(synthetic / "ten.parquet"),
            "--out",
            str(out),
            "execution.encoders=1",
            "execution.gpus_per_encoder=0",
            "execution.cpus_per_encoder=1",
        )
        == 0
    )
    got = tar_bytes(out)
    assert got == {k: v for k, v in tar_bytes(out0).items() if k.startswith("videos/")}
