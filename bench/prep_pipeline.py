"""End-to-end benchmark of the preprocessing job (issue 3). Prints a table.

    python bench/prep_pipeline.py [--videos 48] [--shard 8] [--rows 1000000] [overrides ...]

1. samples/s of a plain single-process loop (the same `Decoder.decode` + `encode_results`
   calls, the same batching, tar bytes built in memory; torch 1 thread) against the Ray job
   (`PrepJob`, everything included: preflight, listing, dispatch, tar + parquet + json commit,
   dataset.json) with 1 and 2 shard workers on a local 2-CPU Ray instance. Worker processes
   are warmed by a first job (models load once per worker process, i.e. once per job).
   Runs are interleaved and repeated (best kept) because other users share the CPUs; CPU
   seconds of the whole process tree are reported too, as they barely depend on contention.
   Parallel efficiency = (2-worker samples/s / plain samples/s) / 2.
2. Orchestration overhead per sample = (1-worker wall - plain wall) / N, also as a fraction of
   the plain loop's per-sample compute. Targets: 2 workers >= 1.6x plain; overhead <= 10%.
3. Driver peak RSS while planning a 1M-row parquet manifest (a fresh interpreter that imports
   ray and the job, then plans every shard with `ShardPlanner`, from parquet footers). Target <= 500 MB.
4. Bytes per 32-frame 448x256 sample, computed from the format (members + tar headers).

Default config: configs/prep/tiny.yaml (tiny models, 8 frames at 128x64); pass overrides such
as `video.frames=32 video.width=448 video.height=256` for the paper size with tiny models.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.config import load_config  # noqa: E402
from core.shard_format import SampleError, SampleRecord, sample_key  # noqa: E402
from pipeline.config import PrepConfig  # noqa: E402
from pipeline.encode_clients import encode_results  # noqa: E402
from pipeline.runner import JobArgs, PrepJob  # noqa: E402
from pipeline.worker_env import set_torch_threads  # noqa: E402
from pipeline.writer import tar_info  # noqa: E402


def make_manifest(root: Path, videos: int) -> Path:
    """`videos` distinct files (copies of 8 synthetic clips under different names)."""
    from preprocessing.synthetic import generate

    rows = generate(root / "syn", videos=8, images=0, seconds=2.0)["videos"]
    out = []
    for i in range(videos):
        src = Path(rows[i % len(rows)]["video"])
        dst = root / "clips" / f"clip{i:05d}{src.suffix}"
        dst.parent.mkdir(exist_ok=True)
        shutil.copyfile(src, dst)
        out.append({"video": str(dst), "caption": rows[i % len(rows)]["caption"]})
    pd.DataFrame(out).to_parquet(root / "videos.parquet", index=False)
    return root / "videos.parquet"


class PlainLoop:
    """The same per-sample calls in this process, no Ray, no files (models loaded once)."""

    def __init__(self, cfg: PrepConfig, manifest: Path):
        from preprocessing.process import Decoder, Encoder

        set_torch_threads(1)
        self.rows = pd.read_parquet(manifest).to_dict("records")
        self.size = max(1, cfg.models.batch_size // cfg.video.frames)
        self.decoder = Decoder(cfg.video, cfg.image, decode_threads=1)
        self.encoder = Encoder(cfg.models)
        first = self.rows[0]
        encode_results(
            self.encoder, [self.decoder.decode("video", first["video"], first["caption"])], self.size
        )

    def run(self) -> tuple[float, int]:
        """(seconds, ok samples) for one pass over the manifest, tar bytes built in memory."""
        start = time.perf_counter()
        ok, batch = 0, []
        with tarfile.open(fileobj=io.BytesIO(), mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for i, row in enumerate(self.rows):
                try:
                    batch.append(self.decoder.decode("video", row["video"], row["caption"]))
                except SampleError:
                    pass
                if batch and (len(batch) == self.size or i == len(self.rows) - 1):
                    for res in encode_results(self.encoder, batch, self.size):
                        if res[0] == "ok":
                            ok += 1
                            for name, data in res[2]:
                                tar.addfile(tar_info(name, len(data)), io.BytesIO(data))
                    batch = []
        return time.perf_counter() - start, ok


def run_job(cfg: PrepConfig, manifest: Path, out: Path) -> tuple[float, list[dict]]:
    start = time.perf_counter()
    summary = PrepJob(cfg, JobArgs(out=str(out), videos=str(manifest))).run()
    wall = time.perf_counter() - start
    assert summary.complete, summary.table()
    return wall, list(summary.kinds["videos"].shard_stats.values())


def tree_cpu() -> float:
    """CPU seconds of this process and every descendant (Ray's raylet/GCS, workers, decoder
    children), alive or already reaped: contention from other users does not inflate it much."""
    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


def planning_rss(root: Path, rows: int) -> dict:
    """Peak RSS of a fresh driver-like process planning a `rows`-row parquet manifest."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = root / "million.parquet"
    ids = np.arange(rows)
    table = pa.table(
        {
            "video": pa.array([f"s3://bucket/videos/{i // 1000:05d}/{i:09d}.mp4" for i in ids]),
            "caption": pa.array([f"a fake caption for clip number {i} with some more words" for i in ids]),
        }
    )
    pq.write_table(table, path, row_group_size=100_000)
    del table
    code = f"""
import json, time, psutil, ray
import pipeline.runner
from pipeline.config import PrepConfig
from pipeline.manifest import Manifest, ShardPlanner
base = psutil.Process().memory_info().rss
t = time.perf_counter()
cfg = PrepConfig()
plans = rows = 0
# The driver plans from footers only (pipeline/plan.py); duplicates are a distributed pass.
for plan in ShardPlanner(Manifest({str(path)!r}, "videos", cfg.manifest, {{}}), cfg.samples_per_shard).run():
    plans += 1
    rows += plan.rows
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the (large) parent process.
hwm = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM"))
print(json.dumps(dict(rows=rows, plans=plans, seconds=time.perf_counter() - t, base_mb=base / 2**20,
                      peak_mb=hwm / 1024)))
"""
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(done.stdout.strip().splitlines()[-1])


def bytes_per_sample(frames: int = 32, width: int = 448, height: int = 256) -> dict[str, int]:
    """Tar bytes of one sample at the given size, from the real member encoding."""
    h, w = height // 8, width // 8
    meta = {
        "source": "s3://bucket/videos/00012/000012345.mp4",
        "kind": "video",
        "frame_indices": list(range(0, 96, 3)),
        "native_fps": 29.97,
        "stride": 3,
        "original_size": [1280, 720],
        "crop_box": [160, 0, 1120, 720],
        "frames": frames,
        "width": width,
        "height": height,
        "target_fps": 8.0,
        "key": "0" * 24,
        "models": {"vae": "stabilityai/stable-diffusion-2-1", "semantic": "timm:vit_small_patch14_dinov2"},
    }
    caption = "a person walking a dog along a sunny beach at sunset, waves rolling in behind them"
    out = {}
    for name, text in (
        ("without text tokens", None),
        ("with text tokens [77,1024]", np.zeros((77, 1024), np.float16)),
    ):
        rec = SampleRecord(
            sample_key(meta["source"]),
            caption,
            np.zeros((frames, 4, h, w), np.float16),
            meta,
            motion=np.zeros(frames - 1, np.float32),
            appearance=np.eye(frames, dtype=np.float32),
            text=text,
        )
        out[name] = sum(512 + -(-len(data) // 512) * 512 for _, data in rec.members())
    out["float16 latents alone"] = frames * 4 * h * w * 2
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=int, default=48)
    parser.add_argument("--shard", type=int, default=8, help="samples per shard")
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the planning manifest")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the best is kept")
    parser.add_argument("--config", default=str(ROOT / "configs" / "prep" / "tiny.yaml"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    import ray

    base = [*args.overrides, f"samples_per_shard={args.shard}", "execution.progress=false"]
    cfg = lambda *extra: load_config(PrepConfig, args.config, [*base, *extra])  # noqa: E731
    root = Path(tempfile.mkdtemp(prefix="bench_prep_"))
    try:
        manifest = make_manifest(root, args.videos)
        warm = make_manifest(root / "warm", 4 * args.shard)
        plain = PlainLoop(cfg(), manifest)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        run_job(cfg("execution.workers=2"), warm, root / "warm_out")  # start + warm both workers
        runs = [
            ("plain loop (1 process, torch 1 thread)", 1),
            ("Ray job, 1 shard worker", 1),
            ("Ray job, 2 shard workers", 2),
        ]
        # Other processes share these 2 CPUs: runs are interleaved and the best of `repeats` kept.
        best: dict[str, tuple[float, float, Any]] = {}
        for r in range(args.repeats):
            for j, (label, workers) in enumerate(runs):
                cpu = tree_cpu()
                if j == 0:
                    wall, ok = plain.run()
                    stats = None
                else:
                    wall, stats = run_job(cfg(f"execution.workers={workers}"), manifest, root / f"out{r}_{j}")
                cpu = tree_cpu() - cpu
                old = best.get(label, (1e9, 1e9, None))
                best[label] = (min(old[0], wall), min(old[1], cpu), stats if wall < old[0] else old[2])
        ray.shutdown()
        rss = planning_rss(root, args.rows)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    n = args.videos
    c = cfg()
    print(
        f"\nEnd to end: {n} videos ({ok} ok), {c.video.frames} frames at {c.video.width}x{c.video.height}, "
        f"models {c.models.vae}/{c.models.semantic}, {args.shard} per shard, 2 CPUs; best of {args.repeats} "
        f"interleaved runs (load average {os.getloadavg()[0]:.1f} at the end)"
    )
    print(
        f"{'run':<40} {'wall s':>7} {'samples/s':>9} {'vs plain':>8} {'efficiency':>10} {'CPU ms/sample':>13}"
    )
    (plain_s, plain_cpu, _), (one_s, one_cpu, one_stats), (two_s, two_cpu, _) = (best[r[0]] for r in runs)
    for (label, workers), (wall, cpu, _) in zip(runs, (best[r[0]] for r in runs)):
        speedup = plain_s / wall
        print(
            f"{label:<40} {wall:>7.2f} {n / wall:>9.2f} {speedup:>7.2f}x {speedup / workers:>9.0%} "
            f"{cpu / n * 1e3:>13.1f}"
        )
    inside = sum(s["seconds"] - s["timing"]["decode_s"] - s["timing"]["encode_s"] for s in one_stats) / n
    print(
        f"\nplain loop per-sample compute: {plain_s / n * 1e3:.1f} ms wall, {plain_cpu / n * 1e3:.1f} ms CPU"
    )
    print("orchestration per sample, 1 worker vs plain (target <= 10% of compute):")
    print(f"  wall: {(one_s - plain_s) / n * 1e3:+.1f} ms = {(one_s - plain_s) / plain_s:+.1%}")
    print(
        f"  CPU of all processes (driver, raylet, GCS, workers): {(one_cpu - plain_cpu) / n * 1e3:+.1f} ms "
        f"= {(one_cpu - plain_cpu) / plain_cpu:+.1%}"
    )
    print(f"  inside shard tasks (fetch, reorder, tar/parquet/json write): {inside * 1e3:.1f} ms")
    print(
        f"2 workers vs plain (target >= 1.6x): measured {plain_s / two_s:.2f}x wall; "
        f"CPU-bound on 2 free cores {2 * plain_cpu / two_cpu:.2f}x (2 x plain CPU / 2-worker CPU)"
    )
    print(
        f"\nplanning {rss['rows']:,} manifest rows into {rss['plans']:,} shards: {rss['seconds']:.1f} s, "
        f"driver RSS after imports {rss['base_mb']:.0f} MB, peak {rss['peak_mb']:.0f} MB (target <= 500 MB)"
    )
    print("\nbytes per 32-frame 448x256 sample (format v1, tar headers included):")
    for name, size in bytes_per_sample().items():
        print(f"  {name:<28} {size:>10,}")


if __name__ == "__main__":
    main()
