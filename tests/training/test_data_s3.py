"""The training stream on S3 (moto's server, reached through s3fs), with and without a flaky
proxy (503 SlowDown, 500, connection reset) in front of it."""

from __future__ import annotations

import torch
from shards import make_dataset

from testing.faults_proxy import FaultProxy
from training.config import DataConfig, RolesConfig
from training.data import RoleLoader
from training.roles import assign_role
from training.sources import list_shards, load_source


def upload(moto_s3, local) -> None:
    fs = moto_s3.fs()
    fs.mkdir("bucket")
    fs.put(str(local / "videos"), "bucket/data/videos", recursive=True)
    fs.put(str(local / "dataset.json"), "bucket/data/dataset.json")


def batches(loader: RoleLoader, n: int) -> list[torch.Tensor]:
    return [next(loader)["latents"] for _ in range(n)]


def test_s3_shards_stream_like_local_ones(tmp_path, moto_s3):
    """fsspec/s3fs in forked loader workers: the same batches as the local copy."""
    opts = moto_s3.options()
    local = make_dataset(tmp_path, video_shards=2, per_shard=3, kinds=("video",))
    upload(moto_s3, local)
    role = assign_role(RolesConfig(video_micro_batch=2), 0, 1)
    urls = list_shards("s3://bucket/data", "video", opts)
    assert urls == ["s3://bucket/data/videos/000000.tar", "s3://bucket/data/videos/000001.tar"]
    remote = RoleLoader(
        load_source("s3://bucket/data", "video", opts, 64), role, DataConfig(storage_options=opts)
    )
    here = RoleLoader(load_source(str(local), "video", text_dim=64), role, DataConfig())
    assert all(torch.equal(a, b) for a, b in zip(batches(remote, 4), batches(here, 4)))


def test_storage_faults_are_retried_and_change_no_batch(tmp_path, moto_s3, monkeypatch):
    import s3fs

    # Our retries only: s3fs and botocore would otherwise absorb most of these faults.
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
    local = make_dataset(tmp_path, video_shards=3, per_shard=3, kinds=("video",))
    upload(moto_s3, local)
    role = assign_role(RolesConfig(video_micro_batch=2), 0, 1)
    source = load_source("s3://bucket/data", "video", moto_s3.options(), 64)  # listing: undisturbed
    want = batches(
        RoleLoader(load_source(str(local), "video", text_dim=64), role, DataConfig(num_workers=0)), 10
    )
    proxy = FaultProxy(moto_s3.endpoint, every=3).start()
    try:
        flaky = dict(moto_s3.options(proxy.url), config_kwargs={"retries": {"total_max_attempts": 1}})
        cfg = DataConfig(num_workers=0, storage_options=flaky, read_retries=6, retry_backoff_s=0.01)
        loader = RoleLoader(source, role, cfg)
        got = batches(loader, 10)
        assert sum(proxy.injected.values()) > 0 and set(proxy.injected) == {
            "slowdown",
            "internal",
            "reset_after",
        }
        assert loader.events["read_retries"] > 0  # our loop, not the client's, rode them out
        assert loader.bad == {}  # no shard skipped
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    finally:
        proxy.stop()
    # Without our retries the faults do skip shards (every other request fails here).
    proxy = FaultProxy(moto_s3.endpoint, every=2).start()
    try:
        flaky = dict(moto_s3.options(proxy.url), config_kwargs={"retries": {"total_max_attempts": 1}})
        no_retry = RoleLoader(source, role, DataConfig(num_workers=0, storage_options=flaky, read_retries=0))
        batches(no_retry, 3)
        assert no_retry.bad["bad_shard"] > 0
    finally:
        proxy.stop()
