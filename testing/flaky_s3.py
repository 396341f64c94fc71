"""The preprocessing job writing its shards to S3 (moto's server) through
`testing.faults_proxy.FaultProxy`, and a check of what reached the bucket: for
tests/faults/test_faults_s3.py and `bench/faults.py`."""

from __future__ import annotations

import io
import json
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from testing.faults_proxy import FaultProxy
from testing.prep_job import check_members, prep_cmd, run, tar_members
from testing.s3 import MotoS3


@contextmanager
def flaky_s3_run(root: Path, every: int = 5):
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
