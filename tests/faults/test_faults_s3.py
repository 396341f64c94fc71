"""Flaky object storage (issue 8): the job writes its shards to S3 (moto's server) through
`testing.faults_proxy.FaultProxy`, which answers every 5th request with 503 SlowDown, 500
InternalError, or forwards it and then resets the connection. The job must finish with every
shard complete (tar + parquet + json), no row lost and no temp object left behind."""

from __future__ import annotations

import io
import json
from contextlib import contextmanager

import pandas as pd
import pytest
from faultlib import check_members, prep_cmd, run, tar_members

from testing.faults_proxy import FaultProxy
from testing.s3 import MotoS3

pytestmark = pytest.mark.slow


@contextmanager
def flaky_s3_run(root, every: int = 5):
    """Runs the job; yields (rc, s3fs filesystem straight to moto, injected fault Counter,
    proxied requests) while moto is still up, so the caller can inspect the bucket."""
    from preprocessing.synthetic import generate

    generate(root / "media", videos=2, images=3, bad=False, seconds=1.5)
    moto = MotoS3().start()
    host, port = moto.host_port
    proxy = FaultProxy(f"http://{host}:{port}", every=every).start()
    try:
        fs = moto.fs()
        fs.mkdir("shards")
        storage = moto.overrides(endpoint=proxy.url)
        cmd = prep_cmd(
            "s3://shards/run",
            str(root / "media" / "videos.parquet"),
            str(root / "media" / "images.parquet"),
            "--samples-per-shard",
            "1",
            *storage,
        )
        rc = run(cmd, root / "prep.log")
        proxy.stop()
        yield rc, fs, proxy.injected, proxy.requests
    finally:
        proxy.stop()
        moto.stop()


def check_bucket(fs, videos: int, images: int) -> dict:
    """Shards per kind complete and every row ok; returns {"lost_samples", "lost_shards", ...}."""
    fs.invalidate_cache()
    keys = [k for k in fs.find("shards/run")]
    names = [k.split("shards/run/", 1)[1] for k in keys]
    temp = [n for n in names if n.startswith("_tmp")]
    report = {"temp_objects": temp, "lost_shards": 0, "lost_samples": 0, "partial_shards": []}
    for kind, rows in (("videos", videos), ("images", images)):
        got = {n.split("/")[1] for n in names if n.startswith(kind + "/")}
        for i in range(rows):
            exts = {e for e in ("tar", "parquet", "json") if f"{i:06d}.{e}" in got}
            if exts != {"tar", "parquet", "json"}:
                report["partial_shards" if exts else "lost_shards"] += [f"{kind}/{i:06d}"] if exts else 1
        ok = 0
        for n in sorted(got):
            if n.endswith(".json"):
                # A committed shard's tar is whole: the size its stats recorded, every member
                # readable, the same keys as its status table's ok rows.
                stats = json.loads(fs.cat_file(f"shards/run/{kind}/{n}"))
                tar = fs.cat_file(f"shards/run/{kind}/{n[:-5]}.tar")
                status = pd.read_parquet(io.BytesIO(fs.cat_file(f"shards/run/{kind}/{n[:-5]}.parquet")))
                keys = check_members(tar_members(tar))
                if len(tar) != stats["tar_bytes"] or keys != status[status.status == "ok"].key.tolist():
                    report["partial_shards"].append(f"{kind}/{n[:-5]}")
                ok += len(keys)
        report["lost_samples"] += rows - ok
    return report


def test_flaky_s3_loses_nothing(tmp_path):
    with flaky_s3_run(tmp_path) as (rc, fs, injected, requests):
        log = (tmp_path / "prep.log").read_text(errors="replace")
        assert rc == 0, log[-4000:]
        assert set(injected) == {"slowdown", "internal", "reset_after"}, (injected, requests)
        report = check_bucket(fs, videos=2, images=3)
        assert report == {"temp_objects": [], "lost_shards": 0, "lost_samples": 0, "partial_shards": []}
        assert fs.exists("shards/run/dataset.json")
