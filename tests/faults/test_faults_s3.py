"""Flaky object storage (issue 8): the job writes its shards to S3 (moto's server) through
`testing.faults_proxy.FaultProxy`, which answers every 5th request with 503 SlowDown, 500
InternalError, or forwards it and then resets the connection. The job must finish with every
shard complete (tar + parquet + json), no row lost and no temp object left behind."""

from __future__ import annotations

import pytest

from testing.flaky_s3 import check_bucket, flaky_s3_run

pytestmark = pytest.mark.slow


def test_flaky_s3_loses_nothing(tmp_path):
    with flaky_s3_run(tmp_path) as (rc, fs, injected, requests):
        log = (tmp_path / "prep.log").read_text(errors="replace")
        assert rc == 0, log[-4000:]
        assert set(injected) == {"slowdown", "internal", "reset_after"}, (injected, requests)
        report = check_bucket(fs, videos=2, images=3)
        assert report == {"temp_objects": [], "lost_shards": 0, "lost_samples": 0, "partial_shards": []}
        assert fs.exists("shards/run/dataset.json")
