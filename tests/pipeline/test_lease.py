"""One job per output (`OUT/_lease.json`): a second job refuses naming the holder, a stale lease
is taken over, temporary files carry the run id, and S3 uses a conditional PUT."""

from __future__ import annotations

import json
import os
import time

import pandas as pd
import pytest

from pipeline.lease import LEASE_FILE, Lease, LeaseError
from pipeline.prep import main
from pipeline.storage import OutputStore


def test_second_job_refuses_naming_the_holder_until_release(tmp_path):
    first = Lease(OutputStore(str(tmp_path)), timeout_s=60).acquire()
    try:
        with pytest.raises(LeaseError) as err:
            Lease(OutputStore(str(tmp_path)), timeout_s=60).acquire()
        assert first.run_id in str(err.value) and str(tmp_path / LEASE_FILE) in str(err.value)
    finally:
        first.release()
    assert not (tmp_path / LEASE_FILE).exists()
    Lease(OutputStore(str(tmp_path)), timeout_s=60).acquire().release()


def test_heartbeat_keeps_a_live_lease_fresh(tmp_path):
    first = Lease(OutputStore(str(tmp_path)), timeout_s=0.8).acquire()
    try:
        before = json.loads((tmp_path / LEASE_FILE).read_text())["heartbeat"]
        time.sleep(1.6)  # two timeouts: only the heartbeat keeps it from going stale
        assert json.loads((tmp_path / LEASE_FILE).read_text())["heartbeat"] > before
        with pytest.raises(LeaseError):
            Lease(OutputStore(str(tmp_path)), timeout_s=0.8).acquire()
    finally:
        first.release()


def test_stale_lease_is_taken_over_and_only_its_temp_files_cleaned(tmp_path):
    dead = {"run_id": "dead-run", "host": "gone", "pid": 1, "heartbeat": time.time() - 3600}
    (tmp_path / LEASE_FILE).write_text(json.dumps(dead))
    for run in ("dead-run", "other-run"):
        (tmp_path / "_tmp" / run).mkdir(parents=True)
        (tmp_path / "_tmp" / run / "videos-000000.tar.abc").write_bytes(b"x")
    lease = Lease(OutputStore(str(tmp_path)), timeout_s=60).acquire()
    try:
        assert lease.taken_over["run_id"] == "dead-run"
        assert json.loads((tmp_path / LEASE_FILE).read_text())["run_id"] == lease.run_id
        store = OutputStore(str(tmp_path), run_id=lease.run_id)
        assert f"/_tmp/{lease.run_id}/" in store.tmp_path("videos-000001.tar")
        store.clean_tmp("dead-run")
        store.clean_tmp()
        assert not (tmp_path / "_tmp" / "dead-run").exists()
        assert (tmp_path / "_tmp" / "other-run" / "videos-000000.tar.abc").exists()
    finally:
        lease.release()


def test_a_replaced_lease_is_noticed(tmp_path):
    lease = Lease(OutputStore(str(tmp_path)), timeout_s=0.4).acquire()
    try:
        lease.check()
        (tmp_path / LEASE_FILE).write_text(json.dumps({"run_id": "intruder", "heartbeat": time.time()}))
        deadline = time.time() + 10
        while lease.lost is None and time.time() < deadline:
            time.sleep(0.05)
        with pytest.raises(LeaseError, match="intruder"):
            lease.check()
    finally:
        lease.release()
    assert json.loads((tmp_path / LEASE_FILE).read_text())["run_id"] == "intruder"  # not ours to delete


def test_s3_lease_uses_a_conditional_put(moto_s3):
    moto_s3.fs().mkdir("bucket")
    opts = moto_s3.options()
    first = Lease(OutputStore("s3://bucket/out", opts), timeout_s=60).acquire()
    try:
        second = Lease(OutputStore("s3://bucket/out", opts), timeout_s=60)
        assert second._create() is False  # the store itself refused the second create
        with pytest.raises(LeaseError, match=first.run_id):
            second.acquire()
    finally:
        first.release()
    assert not moto_s3.fs().exists("bucket/out/" + LEASE_FILE)


def test_prep_refuses_a_held_output_before_any_work(tmp_path, capsys):
    manifest = tmp_path / "videos.parquet"
    pd.DataFrame({"video": ["a.mp4"], "caption": ["a"]}).to_parquet(manifest)
    out = tmp_path / "out"
    holder = Lease(OutputStore(str(out)), timeout_s=60).acquire()
    try:
        assert main(["--videos", str(manifest), "--out", str(out), "execution.progress=false"]) == 2
    finally:
        holder.release()
    err = capsys.readouterr().err
    assert holder.run_id in err and "execution.lease_timeout_s" in err
    assert not (out / "videos").exists() or not any((out / "videos").iterdir())


def test_a_dead_holder_on_this_host_is_stale_at_once(tmp_path):
    import socket
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    fresh = {"run_id": "killed-driver", "host": socket.gethostname(), "pid": gone.pid,
             "heartbeat": time.time()}
    (tmp_path / LEASE_FILE).write_text(json.dumps(fresh))
    lease = Lease(OutputStore(str(tmp_path)), timeout_s=600).acquire()
    try:
        assert lease.taken_over["run_id"] == "killed-driver"
    finally:
        lease.release()
    alive = dict(fresh, pid=os.getpid())  # a live process on this host keeps its lease
    (tmp_path / LEASE_FILE).write_text(json.dumps(alive))
    with pytest.raises(LeaseError, match="killed-driver"):
        Lease(OutputStore(str(tmp_path)), timeout_s=600).acquire()
