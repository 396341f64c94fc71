"""Bounded fetch memory: a shard task's downloads hold at most `http.prefetch_bytes` in RAM;
bodies over `http.spill_bytes` (or past the budget) go to temp files the decoder opens by path,
and the temp files are gone afterwards."""

from __future__ import annotations

import json
import os
import time
import tracemalloc

import pandas as pd
import pytest

from core.config import ConfigError, load_config
from pipeline.config import HttpConfig, PrepConfig
from pipeline.fetch import Fetcher
from pipeline.prefetch import Body, ByteBudget, Spilled
from testing.hostile_http import HostileHTTP

MIB = 1 << 20


def http_cfg(tmp_path, *overrides: str) -> HttpConfig:
    base = ["http.allowed_networks=[127.0.0.1/32]", "http.retries=0", f"http.spill_dir={tmp_path / 'spill'}"]
    return load_config(PrepConfig, None, [*base, *overrides]).http


def payload(i: int, size: int) -> bytes:
    return bytes([i % 251]) * size


def read(item) -> bytes:
    data, error = item
    assert error is None, error
    if isinstance(data, Spilled):
        with open(data.path, "rb") as fh:
            return fh.read()
    return data


def wait_until(cond, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_large_bodies_spill_and_memory_stays_within_the_budget(tmp_path):
    sizes = [4 * MIB, 200_000, 4 * MIB, 4 * MIB, 150_000, 4 * MIB, 4 * MIB, 4 * MIB]
    cfg = http_cfg(tmp_path, f"http.prefetch_bytes={2 * MIB}", f"http.spill_bytes={MIB}",
                   "http.max_concurrency=4")
    with HostileHTTP("127.0.0.1") as server:
        urls = [server.route(f"/f{i}", body=payload(i, n)) for i, n in enumerate(sizes)]
        fetcher = Fetcher(cfg)
        tracemalloc.start()
        try:
            got = []
            for item in fetcher.prefetch(urls):
                got.append((type(item[0]), len(read(item)), read(item)[:1]))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert [n for _, n, _ in got] == sizes
    assert [b for _, _, b in got] == [bytes([i]) for i in range(len(sizes))]
    assert [t for t, _, _ in got] == [Spilled if n > MIB else bytes for n in sizes]
    prefetch = fetcher.prefetcher
    assert prefetch.spilled == 6 and 0 < prefetch.budget.peak <= 2 * MIB
    assert prefetch.budget.held == 0
    # All of it in RAM would be 24 MiB; what Python allocated stays near budget + read buffers.
    assert peak < 2 * MIB + 4 * 2 * MIB + 4 * MIB, peak
    assert os.listdir(tmp_path / "spill") == []  # the task's temp folder is gone


def test_a_full_budget_spills_instead_of_waiting(tmp_path):
    """Files fetched ahead fill the budget while the consumer holds the first one: the later
    downloads go to disk (never waiting: the file needed next must always be able to finish)."""
    sizes = [600_000] * 8
    cfg = http_cfg(tmp_path, f"http.prefetch_bytes={1_500_000}", f"http.spill_bytes={MIB}",
                   "http.max_concurrency=8")
    with HostileHTTP("127.0.0.1") as server:
        urls = [server.route(f"/g{i}", body=payload(i, n)) for i, n in enumerate(sizes)]
        fetcher = Fetcher(cfg)
        stream = fetcher.prefetch(urls)
        first = read(next(stream))
        wait_until(lambda: sum(server.completed.values()) == len(sizes), "all downloads")
        rest = [read(item) for item in stream]
    assert [first, *rest] == [payload(i, n) for i, n in enumerate(sizes)]
    assert fetcher.prefetcher.budget.peak <= 1_500_000
    assert fetcher.prefetcher.spilled >= len(sizes) - 1_500_000 // 600_000 - 1
    assert os.listdir(tmp_path / "spill") == []


def test_stopping_early_removes_the_temp_files(tmp_path):
    cfg = http_cfg(tmp_path, f"http.prefetch_bytes={MIB}", "http.spill_bytes=1000", "http.max_concurrency=4")
    with HostileHTTP("127.0.0.1") as server:
        urls = [server.route(f"/h{i}", body=payload(i, 50_000)) for i in range(6)]
        stream = Fetcher(cfg).prefetch(urls)
        data, _ = next(stream)
        assert isinstance(data, Spilled) and os.path.exists(data.path)
        stream.close()  # a shard task that fails mid-way
    assert not os.path.exists(data.path) and os.listdir(tmp_path / "spill") == []


def test_body_and_budget_units(tmp_path):
    budget = ByteBudget(10)
    assert budget.take(6) and not budget.take(5) and budget.held == 6
    budget.give(6)
    body = Body(budget, spill_bytes=8, spill_dir=lambda: str(tmp_path))
    body.write(b"abc")
    assert budget.held == 3
    body.write(b"defghi")  # past spill_bytes: to disk, its RAM given back
    assert budget.held == 0 and body.path is not None
    result = body.result()
    assert isinstance(result, Spilled) and open(result.path, "rb").read() == b"abcdefghi"
    body.discard()
    assert not os.path.exists(result.path)
    plain = Body()
    plain.write(b"x" * 100)
    assert plain.result() == b"x" * 100
    with pytest.raises(ConfigError, match="spill_bytes"):
        load_config(PrepConfig, None, ["http.prefetch_bytes=10", "http.spill_bytes=20"])


@pytest.mark.slow
def test_prep_over_http_with_every_video_spilled_gives_the_same_shards(
    synthetic, ray_session, prep, tmp_path
):
    videos = pd.read_parquet(synthetic / "ten.parquet")
    videos = videos[~videos.video.str.contains("/bad/")][:5]
    images = pd.read_parquet(synthetic / "good_images.parquet")[:3]
    with HostileHTTP("127.0.0.1") as server:
        bodies = {"videos": [open(p, "rb").read() for p in videos.video],
                  "images": [open(p, "rb").read() for p in images.image]}
        vids = [server.route(f"/v/{i}.mp4", body=b) for i, b in enumerate(bodies["videos"])]
        imgs = [server.route(f"/i/{i}.png", body=b) for i, b in enumerate(bodies["images"])]
        pd.DataFrame({"video": vids, "caption": list(videos.caption)}).to_parquet(tmp_path / "v.parquet")
        pd.DataFrame({"image": imgs, "caption": list(images.caption)}).to_parquet(tmp_path / "i.parquet")
        spill = tmp_path / "spill"
        base = ["--videos", str(tmp_path / "v.parquet"), "--images", str(tmp_path / "i.parquet"),
                "http.allowed_networks=[127.0.0.1/32]"]
        small = ["http.prefetch_bytes=4096", "http.spill_bytes=1000", f"http.spill_dir={spill}"]
        assert prep(*base, "--out", str(tmp_path / "spilled"), *small) == 0
        assert prep(*base, "--out", str(tmp_path / "ram")) == 0
    assert all(len(b) > 1000 for b in bodies["videos"]) and any(len(b) > 1000 for b in bodies["images"])
    for kind, n in (("videos", len(vids)), ("images", len(imgs))):
        stats = [json.loads(p.read_text()) for p in sorted((tmp_path / "spilled" / kind).glob("*.json"))]
        assert sum(s["fetch"]["spilled"] for s in stats) == sum(len(b) > 1000 for b in bodies[kind])
        assert all(s["fetch"]["peak_bytes"] <= 4096 for s in stats)
        tables = sorted((tmp_path / "spilled" / kind).glob("*.parquet"))
        rows = pd.concat([pd.read_parquet(p) for p in tables])
        assert (rows.status == "ok").all() and len(rows) == n
        for tar in sorted((tmp_path / "ram" / kind).glob("*.tar")):
            assert (tmp_path / "spilled" / kind / tar.name).read_bytes() == tar.read_bytes()
    assert spill.is_dir() and os.listdir(spill) == []  # every task's temp folder removed


def test_a_killed_tasks_temp_folder_is_swept_by_the_next(tmp_path):
    import subprocess
    import sys

    from pipeline.prefetch import _PREFIX, _host

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    spill = tmp_path / "spill"
    stale = spill / f"{_PREFIX}{_host()}-{dead}-abc"
    live = spill / f"{_PREFIX}{_host()}-{os.getpid()}-def"  # a running task's folder
    other = spill / f"{_PREFIX}otherhost-{dead}-ghi"  # another host's (a shared disk)
    for folder in (stale, live, other):
        folder.mkdir(parents=True)
        (folder / "x.part").write_bytes(b"x")
    cfg = http_cfg(tmp_path, "http.prefetch_bytes=1000", "http.spill_bytes=10")
    with HostileHTTP("127.0.0.1") as server:
        url = server.route("/big", body=b"y" * 100)
        assert [read(item) for item in Fetcher(cfg).prefetch([url])] == [b"y" * 100]
    assert sorted(os.listdir(spill)) == sorted([live.name, other.name])
