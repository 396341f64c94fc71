"""`ray job submit` for real: a `ray start --head` cluster with its dashboard, the job sent
through the Jobs API (`JobSubmissionClient`, working_dir upload as in the README), and the
output checked. The cluster runs under `ray start --block` in its own temp dir, so teardown
terminates exactly the processes this test started (never `ray stop`, which would kill every
Ray instance of this user on the machine)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from testing.net import free_port

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]




@pytest.fixture
def head_cluster(monkeypatch):
    # Ray >= 2.5x turns on token auth for new clusters; the client must send the token too.
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    temp_dir = tempfile.mkdtemp(prefix="rayjob", dir="/tmp")  # short: unix socket paths are limited
    dashboard = free_port()
    cmd = [
        str(Path(sys.executable).parent / "ray"),
        "start",
        "--head",
        "--block",
        "--num-cpus",
        "2",
        "--include-dashboard=true",
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dashboard),
        "--port",
        str(free_port()),
        "--ray-client-server-port",
        str(free_port()),
        "--dashboard-agent-listen-port",
        str(free_port()),
        "--temp-dir",
        temp_dir,
        "--disable-usage-stats",
    ]
    log = open(Path(temp_dir) / "ray_start.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        from ray.job_submission import JobSubmissionClient

        deadline, client, error = time.time() + 180, None, None
        while client is None and time.time() < deadline and proc.poll() is None:
            try:
                client = JobSubmissionClient(f"http://127.0.0.1:{dashboard}")
            except Exception as exc:  # the dashboard is still starting
                error = exc
                time.sleep(1)
        assert client is not None, (
            f"dashboard did not come up: {error}\n{(Path(temp_dir) / 'ray_start.log').read_text()}"
        )
        yield client
    finally:
        proc.terminate()  # `ray start --block` shuts down the processes it started
        proc.wait(timeout=120)
        log.close()


def test_job_submitted_through_the_jobs_api(head_cluster, synthetic, tmp_path):
    client = head_cluster
    out = tmp_path / "out"
    entrypoint = (
        f"{sys.executable} -m pipeline.prep --videos {synthetic / 'ten.parquet'} --out {out} "
        "--config configs/prep/tiny.yaml execution.progress=false"
    )
    job = client.submit_job(
        entrypoint=entrypoint,
        runtime_env={"working_dir": str(REPO), "excludes": [".git", ".venv", "bench/out"]},
    )
    deadline = time.time() + 400
    while not client.get_job_status(job).is_terminal() and time.time() < deadline:
        time.sleep(2)
    logs = client.get_job_logs(job)
    assert str(client.get_job_status(job)) == "SUCCEEDED", logs[-3000:]
    assert "videos" in logs and "failed by reason: decode_error=1" in logs
    status = pd.concat([pd.read_parquet(p) for p in sorted((out / "videos").glob("*.parquet"))])
    assert len(status) == 10 and (status.status == "ok").sum() == 9
    assert json.loads((out / "dataset.json").read_text())["complete"] is True
