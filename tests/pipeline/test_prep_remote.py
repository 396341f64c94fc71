"""The job against remote storage: S3 (moto's server on 127.0.0.1, through s3fs exactly as
against AWS) and HTTP media from a local server with 404 / flaky 503 / stalling URLs."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture
def s3(moto_s3):
    """(s3fs filesystem, the storage options the job gets) of a fresh moto server."""
    yield moto_s3.fs(), moto_s3.options()


def storage_overrides(options: dict) -> list[str]:
    return [
        f"storage.options.key={options['key']}",
        f"storage.options.secret={options['secret']}",
        f"storage.options.client_kwargs.endpoint_url={options['client_kwargs']['endpoint_url']}",
        f"storage.options.client_kwargs.region_name={options['client_kwargs']['region_name']}",
    ]


def test_s3_manifest_media_and_shards(s3, synthetic, ray_session, prep):
    fs, options = s3
    fs.mkdir("media")
    fs.mkdir("shards")
    manifest = pd.read_parquet(synthetic / "ten.parquet")
    rows = []
    for i, row in enumerate(manifest.itertuples()):
        name = row.video.rsplit("/", 1)[-1]
        fs.put_file(row.video, f"media/clips/{name}")
        # Half absolute s3:// URLs, half relative to the manifest's folder.
        rows.append(
            {"video": f"s3://media/clips/{name}" if i % 2 else f"clips/{name}", "caption": row.caption}
        )
    fs.pipe_file("media/videos.parquet", pd.DataFrame(rows).to_parquet(index=False))

    # A missing bucket is an error before any work (and is never created).
    assert (
        prep("--videos", "s3://media/videos.parquet", "--out", "s3://nobucket/x", *storage_overrides(options))
        == 2
    )
    assert not fs.exists("nobucket")

    out = "s3://shards/run1"
    argv = ["--videos", "s3://media/videos.parquet", "--out", out, *storage_overrides(options)]
    assert prep(*argv) == 0

    # (OUT/_plan/ holds the planner's own files: the dedupe pass, CSV/JSONL conversions)
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.find("shards/run1") if "/_plan/" not in p)
    assert names == [
        "000000.json",
        "000000.parquet",
        "000000.tar",
        "000001.json",
        "000001.parquet",
        "000001.tar",
        "000002.json",
        "000002.parquet",
        "000002.tar",
        "dataset.json",
        "index.parquet",
    ]
    status = pd.concat(
        [pd.read_parquet(io.BytesIO(fs.cat_file(f"shards/run1/videos/00000{i}.parquet"))) for i in range(3)],
        ignore_index=True,
    )
    assert len(status) == 10 and (status.status == "ok").sum() == 9
    assert status.reason[4] == "decode_error" and status.source[4] == "s3://media/clips/random_bytes.mp4"
    keys = []
    for i in range(3):
        with tarfile.open(fileobj=io.BytesIO(fs.cat_file(f"shards/run1/videos/00000{i}.tar"))) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".latents.npy"):
                    keys.append(member.name.split(".")[0])
                    latents = np.load(io.BytesIO(tar.extractfile(member).read()), allow_pickle=False)
                    assert latents.shape == (8, 4, 8, 16)
    assert keys == status.query("status == 'ok'").key.tolist()
    dataset = json.loads(fs.cat_file("shards/run1/dataset.json"))
    assert dataset["totals"]["videos"]["ok"] == 9
    assert "testing" not in json.dumps(dataset)  # credentials never reach the outputs

    # Resume on S3: a committed shard is skipped, a shard without its json is redone.
    before = {p: fs.info(p)["LastModified"] for p in fs.find("shards/run1/videos") if p.endswith(".tar")}
    fs.rm_file("shards/run1/videos/000002.json")
    assert prep(*argv) == 0
    after = {p: fs.info(p)["LastModified"] for p in before}
    assert [p for p in before if before[p] != after[p]] in ([], ["shards/run1/videos/000002.tar"])
    assert fs.exists("shards/run1/videos/000002.json")


def test_http_manifest_and_media_with_retries_and_timeouts(
    media_server, synthetic, ray_session, prep, tmp_path
):
    base, hits, files = media_server
    names = sorted(p.name for p in (synthetic / "images").iterdir())[:3]
    urls = [f"{base}/img/{n}" for n in names]
    urls += [f"{base}/missing.png", f"{base}/flaky.png", f"{base}/stall.png"]
    # LAION layout: URL / TEXT columns (found without configuration), extra columns ignored;
    # the manifest itself is served over HTTP too.
    laion = pd.DataFrame({"URL": urls, "TEXT": [f"picture {i}" for i in range(6)], "WIDTH": 640})
    files["laion.parquet"] = laion.to_parquet(index=False)
    out = tmp_path / "out"
    http = ["http.timeout_s=1", "http.retries=2", "http.backoff_s=0.05", "http.max_concurrency=4"]
    http.append("http.allowed_networks=[127.0.0.1]")  # the media server is on loopback (blocked by default)
    assert (
        prep("--images", f"{base}/files/laion.parquet", "--out", str(out), "--samples-per-shard", "6", *http)
        == 0
    )
    status = pd.read_parquet(out / "images" / "000000.parquet")
    assert status.status.tolist() == ["ok", "ok", "ok", "failed", "ok", "failed"]
    assert status.reason[3] == "not_found" and "404" in status.detail[3]
    assert status.reason[5] == "timeout"
    assert hits["/missing.png"] == 1 and hits["/flaky.png"] == 3 and hits["/stall.png"] == 3
    assert status.key[4] != status.key[0] and all(status.source == urls)
