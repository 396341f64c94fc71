"""Fault-injection benchmark of the preprocessing job (issue 8). Prints a table: each fault
injected, how often, and what was lost (target: nothing).

    python bench/faults.py [--every 5]

Reduced versions of tests/faults (same helpers, tiny config, a 2-CPU local Ray per job):
1. hostile corpus: ~50 rows of broken / odd media and captions (tests/faults/faultlib.py);
   lost = rows missing from the status tables or good rows not ok; unsafe tar members.
2. driver SIGKILL after the first shard commit, then the same command again.
3. SIGKILL of a Ray worker while it writes a shard (Ray retries the task).
4. S3 through `testing.faults_proxy.FaultProxy` (every Nth request: 503 SlowDown, 500,
   or forwarded then connection reset) in front of moto's server.
For 2 and 3 "identical" compares tars byte for byte (and status rows) with an undisturbed run.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "faults"))

import faultlib as fl  # noqa: E402


def hostile(tmp: Path) -> dict:

    corpus = fl.build_hostile_corpus(tmp / "media")
    out = tmp / "out"
    rc = fl.run(fl.prep_cmd(str(out), corpus["videos"], corpus["images"]), tmp / "log", timeout=600)
    rows = lost = wrong = unsafe = shards_lost = 0
    for kind in ("videos", "images"):
        status = fl.status_rows(out, kind)
        expect = corpus["expect"][kind]
        rows += len(expect)
        lost += len(expect) - len(status)  # rows missing from every status table
        shards_lost += -(-len(expect) // 4) - len(list((out / kind).glob("*.json")))  # tiny: 4/shard
        for i, row in status.iterrows():
            if expect[i] == "ok" and row.status != "ok":
                lost += 1  # a good sample dropped
            elif expect[i].startswith("failed") and row.status != "failed":
                wrong += 1  # a bad one let through
        for tar in (out / kind).glob("*.tar"):
            try:
                fl.check_members(fl.tar_members(tar.read_bytes()))
            except AssertionError:
                unsafe += 1
    return dict(
        fault=f"hostile corpus ({len(set(corpus['kinds']))} kinds)",
        often=f"{rows} rows",
        lost=lost,
        shards_lost=shards_lost,
        note=f"rc={rc}, {wrong} bad rows not failed, {unsafe} unsafe tars",
    )


def _small(tmp: Path) -> tuple[tuple, Path]:
    from preprocessing.synthetic import generate

    generate(tmp / "media", videos=4, images=3, bad=False, seconds=1.5)
    args = (
        str(tmp / "media" / "videos.parquet"),
        str(tmp / "media" / "images.parquet"),
        "--samples-per-shard",
        "1",
    )
    ref = tmp / "ref"
    assert fl.run(fl.prep_cmd(str(ref), *args), tmp / "ref.log") == 0
    return args, ref


def _compare(out: Path, ref: Path) -> tuple[int, int, bool]:
    want, got = fl.tar_bytes(ref), fl.tar_bytes(out)
    ok = lambda d: sum(sum(r["status"] == "ok" for r in rows) for rows in fl.status_tables(d).values())  # noqa: E731
    same = want == got and fl.status_tables(out) == fl.status_tables(ref)
    return ok(ref) - ok(out), len(set(want) - set(got)), same


def driver_kill(tmp: Path, args: tuple, ref: Path) -> dict:
    out = tmp / "driver"
    cmd = fl.prep_cmd(str(out), *args)
    proc = fl.start(cmd, tmp / "d1.log")
    try:
        fl.wait_for(lambda: list(out.glob("*/*.json")), 300, proc, "first commit")
        done = len(list(out.glob("*/*.json")))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        leftovers = fl.wait_group_gone(proc, timeout=20)
    finally:
        fl.stop_group(proc)
    rc = fl.run(cmd, tmp / "d2.log")
    lost, shards_lost, same = _compare(out, ref)
    return dict(
        fault="SIGKILL driver after 1st commit, rerun",
        often="1 per job",
        lost=lost,
        shards_lost=shards_lost,
        note=f"rc={rc}, {done} shard(s) done before the kill, "
        f"identical={same}, {len(leftovers)} Ray process(es) outlived the driver 20 s",
    )


def worker_kill(tmp: Path, args: tuple, ref: Path) -> dict:
    import psutil

    out = tmp / "worker"
    proc = fl.start(fl.prep_cmd(str(out), *args), tmp / "w.log")

    def workers() -> list[int]:
        found = []
        for pid in fl.group_pids(proc):
            try:
                if psutil.Process(pid).cmdline()[:1] == ["ray::_run_shard"]:
                    found.append(pid)
            except (psutil.Error, IndexError):
                pass
        return found

    try:
        fl.wait_for(
            lambda: (out / "_tmp").exists() and any((out / "_tmp").glob("*/*.tar.*")) and workers(),
            300,
            proc,
            "a shard in progress",
        )
        os.kill(workers()[0], signal.SIGKILL)
        rc = proc.wait(timeout=480)
    finally:
        fl.stop_group(proc)
    lost, shards_lost, same = _compare(out, ref)
    retried = "will be retried" in (tmp / "w.log").read_text(errors="replace")
    return dict(
        fault="SIGKILL Ray worker mid-shard",
        often="1 per job",
        lost=lost,
        shards_lost=shards_lost,
        note=f"rc={rc}, task retried={retried}, identical={same}",
    )


def flaky_s3(tmp: Path, every: int) -> dict:
    import test_faults_s3 as s3t

    with s3t.flaky_s3_run(tmp, every=every) as (rc, fs, injected, requests):
        report = s3t.check_bucket(fs, videos=2, images=3)
    faults = ", ".join(f"{k}={v}" for k, v in sorted(injected.items()))
    return dict(
        fault=f"S3: {faults}",
        often=f"1 in {every} of {requests} requests",
        lost=report["lost_samples"],
        shards_lost=report["lost_shards"],
        note=f"rc={rc}, partial shards={len(report['partial_shards'])}, "
        f"temp objects left={len(report['temp_objects'])}",
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--every", type=int, default=5, help="S3 proxy: fail every Nth request")
    args = parser.parse_args(argv)
    rows = []
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="faults") as d:
        tmp = Path(d)
        for name in ("hostile", "small", "s3"):
            (tmp / name).mkdir()
        rows.append(hostile(tmp / "hostile"))
        small_args, ref = _small(tmp / "small")
        rows.append(driver_kill(tmp / "small", small_args, ref))
        rows.append(worker_kill(tmp / "small", small_args, ref))
        rows.append(flaky_s3(tmp / "s3", args.every))
    header = f"{'fault injected':<52} {'how often':<26} {'samples lost':>12} {'shards lost':>11}  notes"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['fault']:<52} {r['often']:<26} {r['lost']!s:>12} {r['shards_lost']!s:>11}  {r['note']}")
    print(f"({time.time() - start:.0f} s; target: 0 samples and 0 shards lost everywhere)")


if __name__ == "__main__":
    main()
