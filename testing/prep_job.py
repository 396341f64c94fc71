"""The preprocessing job as a subprocess, for the fault tests and `bench/faults.py`.

The job runs in its own session/process group, so a test can SIGKILL it and clean up exactly
what it started; `small_run` is the shared little corpus with its undisturbed reference run;
the checks read an output root (every row accounted for, safe tar members, no pickles).
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "prep" / "tiny.yaml")
MEMBER = r"^[0-9a-f]+\.[a-z0-9_.]+$"  # `<hex key>.<ext>`: no folders, no '..', no leading dot
SMALL_SHARDS = 7  # `small_run`: 4 videos + 3 images at one sample per shard


# ---------------------------------------------------------------- running the job


def prep_cmd(out: str, videos: str | None = None, images: str | None = None, *extra: str) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "pipeline.prep",
        "--out",
        out,
        "--config",
        TINY,
        "execution.progress=false",
        "execution.local_cpus=2",
        *extra,
    ]
    if videos:
        cmd += ["--videos", videos]
    if images:
        cmd += ["--images", images]
    return cmd


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    """The job in its own session/process group: `stop_group` ends it and every process it
    started (Ray's GCS, raylet, workers, decoder children), nothing else."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_DISABLE_USAGE_STATS"] = "1"
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True
    )


def stop_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


def group_pids(proc: subprocess.Popen) -> list[int]:
    import psutil

    pids = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getsid(p.info["pid"]) == proc.pid:
                pids.append(p.info["pid"])
        except (ProcessLookupError, PermissionError):
            pass
    return pids


def wait_group_gone(proc: subprocess.Popen, timeout: float = 60.0) -> list[str]:
    """Processes of the job's session still alive after `timeout` s (then killed)."""
    deadline = time.time() + timeout
    while time.time() < deadline and group_pids(proc):
        time.sleep(0.5)
    import psutil

    left = []
    for pid in group_pids(proc):
        try:
            left.append(f"{pid} {' '.join(psutil.Process(pid).cmdline())[:120]}")
        except psutil.Error:
            pass
    stop_group(proc)
    return left


def run(cmd: list[str], log: Path, timeout: float = 480) -> int:
    proc = start(cmd, log)
    try:
        return proc.wait(timeout=timeout)
    finally:
        stop_group(proc)


def ray_shard_workers(proc: subprocess.Popen) -> list[int]:
    """Pids of the job's Ray workers that are running a shard task right now."""
    import psutil

    found = []
    for pid in group_pids(proc):
        try:
            if psutil.Process(pid).cmdline()[:1] == ["ray::_run_shard"]:
                found.append(pid)
        except (psutil.Error, IndexError):
            pass
    return found


def shard_in_progress(out: Path, proc: subprocess.Popen) -> bool:
    """A shard task is running and has its temp tar open: the middle of a shard."""
    tmp = out / "_tmp"
    # temp files live under _tmp/RUN_ID/ (one folder per run)
    return tmp.exists() and any(tmp.glob("*/*.tar.*")) and bool(ray_shard_workers(proc))


def wait_for(cond, timeout: float, proc: subprocess.Popen | None = None, what: str = "") -> None:
    deadline = time.time() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"job exited ({proc.returncode}) before {what}")
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# ---------------------------------------------------------------- checking an output


def status_rows(out: Path, kind: str) -> pd.DataFrame:
    files = sorted((out / kind).glob("*.parquet"))
    return pd.concat([pd.read_parquet(p) for p in files], ignore_index=True) if files else pd.DataFrame()


def tar_members(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(m.name, tar.extractfile(m).read() if m.isfile() else b"") for m in tar.getmembers()]


def check_members(members: list[tuple[str, bytes]]) -> list[str]:
    """Every member `<hex key>.<ext>`, each .npy loads without pickle. Returns sample keys."""
    keys: list[str] = []
    for name, data in members:
        assert re.match(MEMBER, name) and "/" not in name and ".." not in name, name
        if name.endswith(".npy"):
            np.load(io.BytesIO(data), allow_pickle=False)
        if name.endswith(".json"):
            json.loads(data)
        key = name.split(".", 1)[0]
        if not keys or keys[-1] != key:
            keys.append(key)
    return keys


def tar_bytes(out: Path) -> dict[str, bytes]:
    return {f"{p.parent.name}/{p.name}": p.read_bytes() for p in sorted(out.glob("*/*.tar"))}


def status_tables(out: Path) -> dict[str, list]:
    """Status parquet contents per shard (the bytes may differ only in parquet metadata). Read
    with pyarrow, not pandas: a null float column becomes NaN in pandas, and NaN != NaN."""
    return {
        f"{p.parent.name}/{p.name}": pq.read_table(p).to_pylist()
        for p in sorted(out.glob("*/*.parquet"))
    }


def committed(out: Path) -> list[Path]:
    """Stats json of every committed shard (written last, so a shard with one is complete)."""
    return sorted(out.glob("*/*.json"))


# ---------------------------------------------------------------- the small corpus


def small_run(root: Path) -> tuple[tuple[str, ...], Path]:
    """4 videos + 3 images at one sample per shard (SMALL_SHARDS shards) under `root/media`,
    and an undisturbed run of them in `root/ref`. Returns (the job's arguments, ref root)."""
    from preprocessing.synthetic import generate

    generate(root / "media", videos=4, images=3, bad=False, seconds=1.5)
    args = (
        str(root / "media" / "videos.parquet"),
        str(root / "media" / "images.parquet"),
        "--samples-per-shard",
        "1",
    )
    ref = root / "ref"
    rc = run(prep_cmd(str(ref), *args), root / "ref.log")
    if rc != 0:
        raise AssertionError(f"the reference run failed (rc={rc}): {(root / 'ref.log').read_text()[-3000:]}")
    return args, ref
