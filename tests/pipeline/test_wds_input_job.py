"""The preprocessing job on WebDataset tars (video2dataset / img2dataset output) as input, end to
end on the session's Ray instance: keys, captions and `source_meta` read back, bad samples as
failed rows, resume and byte-identical reruns, and tars on S3 (moto) with brace expansion."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from wdslib import i2d_tars, sample, tar_of, v2d_tars

from core.shard_format import sample_key

pytestmark = pytest.mark.slow


def status(out: Path, kind: str) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(f) for f in sorted((out / kind).glob("*.parquet"))], ignore_index=True)


def shard_samples(tars: list[bytes]) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes} of the output shards, with stock tarfile."""
    out: dict[str, dict[str, bytes]] = {}
    for data in tars:
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def tar_bytes(out: Path) -> dict[str, bytes]:
    kinds = ("videos", "images")
    return {f"{k}/{p.name}": p.read_bytes() for k in kinds for p in sorted((out / k).glob("*.tar"))}


@pytest.fixture(scope="module")
def wds_inputs(synthetic, tmp_path_factory):
    """v2d/: 3 tars of 3 videos (plus a 4th tar: one sample without caption, one without media);
    i2d/: 3 tars of 2 images."""
    root = tmp_path_factory.mktemp("wds")
    videos = v2d_tars(synthetic, root / "v2d")
    broken = sample("000030000", "mp4", Path(videos[0]["path"]).read_bytes(), None, {"url": "nocap"})
    broken += sample("000030001", None, None, "a caption without a video", {"url": "nomedia"})
    (root / "v2d" / "00003.tar").write_bytes(tar_of(broken))
    images = i2d_tars(synthetic, root / "i2d", per_tar=2)
    return root, videos, images


@pytest.fixture(scope="module")
def wds_run(wds_inputs, ray_session, prep_module):
    root, _, _ = wds_inputs
    out = root / "out"
    images = str(root / "i2d" / "{00000..00002}.tar")
    argv = ["--videos", str(root / "v2d"), "--images", images, "--out", str(out)]
    assert prep_module(*argv) == 0
    return out, argv


@pytest.fixture(scope="module")
def prep_module():
    """`python -m pipeline.prep` in this process with the tiny config (module-scoped `prep`)."""
    from pipeline.prep import main

    tiny = str(Path(__file__).parents[2] / "configs" / "prep" / "tiny.yaml")
    return lambda *argv: main(["--config", tiny, *argv, "execution.progress=false"])


def storage_overrides(options: dict) -> list[str]:
    kwargs = options["client_kwargs"]
    return [f"storage.options.key={options['key']}", f"storage.options.secret={options['secret']}",
            f"storage.options.client_kwargs.endpoint_url={kwargs['endpoint_url']}",
            f"storage.options.client_kwargs.region_name={kwargs['region_name']}"]


def test_every_input_sample_is_a_row_with_its_tar_and_key(wds_run, wds_inputs):
    out, _ = wds_run
    root, videos, images = wds_inputs
    table = status(out, "videos")
    expected = [f"{r['tar']}#{r['key']}" for r in videos]
    broken = [f"{root}/v2d/00003.tar#000030000", f"{root}/v2d/00003.tar#000030001"]
    assert table.source.tolist() == expected + broken  # tar order, every sample once
    assert table.row.tolist() == list(range(len(expected) + 2))
    assert (table.status[: len(expected)] == "ok").all()
    failed = table.iloc[len(expected) :]
    assert failed.reason.tolist() == ["bad_caption", "missing_file"]
    for detail, key in zip(failed.detail, ("000030000", "000030001")):
        assert "00003.tar" in detail and key in detail
    assert status(out, "images").source.tolist() == [f"{r['tar']}#{r['key']}" for r in images]
    assert (status(out, "images").status == "ok").all()


def test_captions_and_source_meta_read_back(wds_run, wds_inputs):
    out, _ = wds_run
    _, videos, images = wds_inputs
    for kind, records in (("videos", videos), ("images", images)):
        samples = shard_samples([p.read_bytes() for p in sorted((out / kind).glob("*.tar"))])
        assert len(samples) == len(records)
        for r in records:
            key = sample_key(f"{r['tar']}#{r['key']}")
            meta = json.loads(samples[key]["json"])
            assert meta["source_meta"] == r["meta"]
            assert meta["source"] == f"{r['tar']}#{r['key']}"
            assert samples[key]["txt"].decode() == r["caption"]
            assert "latents.npy" in samples[key]


def test_rerun_resumes_retries_and_a_fresh_run_is_byte_identical(wds_run, wds_inputs, prep_module, tmp_path):
    out, argv = wds_run
    before = tar_bytes(out)
    (out / "videos" / "000001.json").unlink()  # a shard not committed is redone
    assert prep_module(*argv) == 0
    assert tar_bytes(out) == before
    failed = status(out, "videos").query("status == 'failed'")
    assert prep_module(*argv, "--retry-failed") == 0  # the bad samples are redone, and fail again
    assert tar_bytes(out) == before
    assert status(out, "videos").query("status == 'failed'")[["source", "reason"]].equals(
        failed[["source", "reason"]])
    fresh = tmp_path / "again"
    assert prep_module(*argv[:-1], str(fresh)) == 0
    assert tar_bytes(fresh) == before


def test_tars_on_s3_with_brace_expansion(moto_s3, wds_inputs, ray_session, prep_module, tmp_path):
    root, videos, _ = wds_inputs
    fs = moto_s3.fs()
    fs.mkdir("wds")
    for i in range(3):
        fs.put_file(str(root / "v2d" / f"{i:05d}.tar"), f"wds/v2d/{i:05d}.tar")
    out = tmp_path / "s3out"
    argv = ["--videos", "s3://wds/v2d/{00000..00002}.tar", "--out", str(out),
            *storage_overrides(moto_s3.options())]
    assert prep_module(*argv) == 0
    table = status(out, "videos")
    assert table.source.tolist() == [f"s3://wds/v2d/{r['tar'][-9:]}#{r['key']}" for r in videos]
    assert (table.status == "ok").all()
    remote = shard_samples([p.read_bytes() for p in sorted((out / "videos").glob("*.tar"))])
    for r in videos:  # media read by range from S3 (frames differ: the clip start follows the key)
        got = remote[sample_key(f"s3://wds/v2d/{r['tar'][-9:]}#{r['key']}")]
        assert np.load(io.BytesIO(got["latents.npy"]), allow_pickle=False).shape == (8, 4, 8, 16)
        assert json.loads(got["json"])["source_meta"] == r["meta"] and got["txt"].decode() == r["caption"]
