"""Cost of the planner and of the distributed dedupe pass (issue 15). Prints a table.

    python bench/plan_dedupe.py [--rows 1000000 2000000] [--files 10] [--dup 0.05] [--cpus 2]

For each row count: a generated parquet manifest (LAION-like URLs, `--dup` of the rows repeat
an earlier row), then, in this driver process, (1) planning every shard from footers
(`ShardPlanner`, seconds and the driver's RSS growth) and (2) `find_duplicates` on a local Ray
instance with `--cpus` CPUs: wall seconds and rows/s for the three rounds together. The old
driver-side `SeenSources` cost 7.3 us a row on these 2 shared cores (issue 15). Timings are
noisy: other users share the cores.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def manifest(folder: Path, rows: int, files: int, dup: float) -> int:
    rng = np.random.default_rng(0)
    ids = np.arange(rows)
    repeat = rng.random(rows) < dup
    ids[repeat] = (rng.random(repeat.sum()) * np.maximum(ids[repeat], 1)).astype(np.int64)
    per = -(-rows // files)
    for n in range(files):
        part = ids[n * per:(n + 1) * per]
        table = pa.table({"image": [f"https://img{i % 97}.test/{i:010d}.jpg?w=512" for i in part],
                          "caption": ["a generated caption"] * len(part)})
        pq.write_table(table, folder / f"part-{n:05d}.parquet", row_group_size=65_536)
    return int(rows - len(np.unique(ids)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 2_000_000])
    parser.add_argument("--files", type=int, default=10)
    parser.add_argument("--dup", type=float, default=0.05)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    args = parser.parse_args()

    import ray

    from pipeline.config import PrepConfig
    from pipeline.dedupe import find_duplicates
    from pipeline.manifest import Manifest
    from pipeline.plan import ShardPlanner

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    lines = [f"{'rows':>10} {'files':>6} {'shards':>7} {'plan s':>7} {'plan RSS+MB':>11} "
             f"{'dedupe s':>9} {'dedupe rows/s':>14} {'dups':>8} {'expected':>8} {'buckets':>7}"]
    proc = psutil.Process()
    for rows in args.rows:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "m"
            folder.mkdir()
            expected = manifest(folder, rows, args.files, args.dup)
            cfg = PrepConfig().manifest
            rss = proc.memory_info().rss
            t = time.perf_counter()
            m = Manifest(str(folder), "images", cfg, {}, plan_root=str(Path(tmp) / "_plan"))
            shards = sum(1 for _ in ShardPlanner(m, args.samples_per_shard).run())
            plan_s = time.perf_counter() - t
            grown = (proc.memory_info().rss - rss) / 2**20
            t = time.perf_counter()
            index = find_duplicates(m, args.samples_per_shard)
            dedupe_s = time.perf_counter() - t
            lines.append(f"{rows:>10,} {args.files:>6} {shards:>7} {plan_s:>7.2f} {grown:>11.1f} "
                         f"{dedupe_s:>9.1f} {rows / dedupe_s:>14,.0f} {index.stats['duplicates']:>8} "
                         f"{expected:>8} {index.stats['buckets']:>7}")
    ray.shutdown()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
