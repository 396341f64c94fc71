"""Duplicate sources without driver state: a distributed, hash-partitioned pass (`dedupe: source`).

A source repeated later in the manifest fails as `duplicate`, naming the earlier manifest row,
so a key appears once per dataset even when the two rows sit in different shards. The driver
holds only task handles and the set of shards that have duplicates (O(shards)); rows are read
by Ray tasks, in three rounds, all files under `OUT/_plan/dedupe/KIND-KEY/`:

1. scan (one task per `CHUNK_ROWS` rows): read the media column of its row range exactly as a
   shard task does (resolve, redact: `pipeline.plan.stored_sources`), take the 96-bit
   `sample_key` digest of every non-empty source, and write (digest, row) records into one
   file per hash bucket (`scan/bJJJJ/cCCCCCC.npy`).
2. bucket (one task per bucket): sort its records by (digest, row); every record after the
   first of its digest is a duplicate of that first row. The (row, first row) pairs are written
   partitioned by shard range (`dups/rRRRR/bJJJJ.npy`).
3. collate (one task per shard range): one `shard-NNNNNN.npy` of (row, first row) pairs per
   shard that has duplicates; the shard task reads it into `ShardPlan.duplicate_of`.

KEY hashes the manifest files' records (path, size, ETag/mtime, rows), the columns, the
redaction and the shard size, so a rerun over the same files reuses the result (`done.json`)
and any change computes it again. `dedupe: none` skips the pass: repeats within one shard
still fail `duplicate` (a tar cannot hold one key twice), repeats across shards are kept.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fsspec.implementations.local import LocalFileSystem

from pipeline.plan import Piece, ReadSpec, cut, read_columns, stored_sources
from pipeline.storage import url_to_fs

CHUNK_ROWS = 1_000_000  # rows per scan task
BUCKET_ROWS = 4_000_000  # rows per bucket task (~20 bytes each in memory)
DEDUPE_VERSION = 1
RECORD = np.dtype([("a", "<u8"), ("b", "<u4"), ("row", "<i8")])  # 96-bit key digest + manifest row


@dataclass
class DuplicateIndex:
    """Where the per-shard duplicate lists are, and which shards have one."""

    folder: str
    shards: frozenset[int] = field(default_factory=frozenset)
    stats: dict[str, Any] = field(default_factory=dict)

    def path(self, index: int) -> str | None:
        return f"{self.folder}/shard-{index:06d}.npy" if index in self.shards else None


def _makedirs(fs: Any, folder: str) -> None:
    # Object stores have no folders (and s3fs's makedirs may create buckets): local disks only.
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(folder, exist_ok=True)


def _save(fs: Any, path: str, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    _makedirs(fs, path.rsplit("/", 1)[0])
    fs.pipe_file(path, buf.getvalue())


def _load_all(fs: Any, folder: str, dtype: np.dtype) -> np.ndarray:
    try:
        names = sorted(fs.ls(folder, detail=False))
    except FileNotFoundError:
        return np.empty(0, dtype)
    parts = [np.load(io.BytesIO(fs.cat_file(n)), allow_pickle=False) for n in names if n.endswith(".npy")]
    return np.concatenate(parts) if parts else np.empty(0, dtype)


def digests(sources: list[str | None], first_row: int) -> np.ndarray:
    """(digest, row) records of the non-empty sources; the digest is `sample_key`'s 96 bits."""
    from core.shard_format import sample_key

    rows = [first_row + i for i, s in enumerate(sources) if s]
    keys = "".join(sample_key(s) for s in sources if s)
    out = np.empty(len(rows), RECORD)
    raw = np.frombuffer(bytes.fromhex(keys), dtype=[("a", ">u8"), ("b", ">u4")])
    out["a"], out["b"], out["row"] = raw["a"], raw["b"], rows
    return out


def scan(spec: ReadSpec, pieces: tuple[Piece, ...], first_row: int, folder: str, chunk: int,
         buckets: int) -> int:
    """Round 1 (a Ray task): hash-partition one row range's sources into bucket files."""
    fs, root = url_to_fs(folder, spec.storage_options)
    values = read_columns(spec, pieces, (spec.source_column,))
    records = digests(stored_sources(spec, values)[0], first_row)
    which = records["a"] % np.uint64(buckets)
    for j in np.unique(which):
        _save(fs, f"{root}/scan/b{int(j):04d}/c{chunk:06d}.npy", records[which == j])
    return len(records)


def bucket(folder: str, j: int, size: int, shards: int, ranges: int, options: dict[str, Any]) -> int:
    """Round 2 (a Ray task): the repeats within bucket `j`, as (row, first row) pairs."""
    fs, root = url_to_fs(folder, options)
    records = _load_all(fs, f"{root}/scan/b{j:04d}", RECORD)
    if not len(records):
        return 0
    records = records[np.lexsort((records["row"], records["b"], records["a"]))]
    starts = np.ones(len(records), bool)
    starts[1:] = (records["a"][1:] != records["a"][:-1]) | (records["b"][1:] != records["b"][:-1])
    first = records["row"][starts][np.cumsum(starts) - 1]
    dup = ~starts
    pairs = np.stack([records["row"][dup], first[dup]], axis=1).astype(np.int64)
    where = (pairs[:, 0] // size) * ranges // max(shards, 1)
    for r in np.unique(where):
        _save(fs, f"{root}/dups/r{int(r):04d}/b{j:04d}.npy", pairs[where == r])
    return len(pairs)


def collate(folder: str, r: int, size: int, options: dict[str, Any]) -> list[int]:
    """Round 3 (a Ray task): one (row, first row) list per shard of range `r`; returns those shards."""
    fs, root = url_to_fs(folder, options)
    pairs = _load_all(fs, f"{root}/dups/r{r:04d}", np.dtype(np.int64)).reshape(-1, 2)
    pairs = pairs[np.argsort(pairs[:, 0], kind="stable")]
    shard = pairs[:, 0] // size
    out = []
    for s in np.unique(shard):
        _save(fs, f"{root}/shard-{int(s):06d}.npy", pairs[shard == s])
        out.append(int(s))
    return out


def pass_key(records: list[dict[str, Any]], spec: ReadSpec, size: int) -> str:
    blob = json.dumps([DEDUPE_VERSION, size, spec.source_column, spec.local, list(spec.redact_params),
                       [[r.get(k) for k in ("path", "size", "etag", "mtime", "rows")] for r in records]],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def find_duplicates(manifest: Any, size: int) -> DuplicateIndex:
    """Run (or reuse) the pass over `manifest` (a `pipeline.manifest.Manifest` whose files are
    converted) for shards of `size` rows."""
    import ray

    spec, files, records = manifest.read_spec(), manifest.plan_files(), manifest.file_records()
    opts = spec.storage_options
    folder = f"{manifest.plan_root.rstrip('/')}/dedupe/{manifest.kind}-{pass_key(records, spec, size)}"
    fs, root = url_to_fs(folder, opts)
    if fs.exists(f"{root}/done.json"):
        done = json.loads(fs.cat_file(f"{root}/done.json"))
        return DuplicateIndex(folder, frozenset(done["shards"]), done)
    start = time.perf_counter()
    total = sum(f.rows for f in files)
    shards = -(-total // size)
    buckets = int(min(1024, max(1, -(-total // BUCKET_ROWS))))
    task = dict(num_cpus=1, max_retries=2)
    scans = [ray.remote(scan).options(**task).remote(spec, pieces, first, folder, chunk, buckets)
             for chunk, first, pieces in cut(files, CHUNK_ROWS)]
    hashed = sum(ray.get(scans))
    found = sum(ray.get([ray.remote(bucket).options(**task).remote(folder, j, size, shards, buckets, opts)
                         for j in range(buckets)]))
    with_dups = ray.get([ray.remote(collate).options(**task).remote(folder, r, size, opts)
                         for r in range(buckets)])
    seconds = time.perf_counter() - start
    done = dict(shards=sorted(s for part in with_dups for s in part), rows=total, hashed=hashed,
                duplicates=found, buckets=buckets, seconds=round(seconds, 3),
                rows_per_s=round(total / max(seconds, 1e-9), 1))
    for sub in ("scan", "dups"):  # intermediate records: only the per-shard lists are read later
        if fs.exists(f"{root}/{sub}"):
            fs.rm(f"{root}/{sub}", recursive=True)
    _makedirs(fs, root)
    fs.pipe_file(f"{root}/done.json", json.dumps(done).encode())
    return DuplicateIndex(folder, frozenset(done["shards"]), done)


def read_duplicates(url: str, options: dict[str, Any]) -> list[tuple[int, int]]:
    """A shard's (row, first row) pairs, as written by `collate`."""
    fs, path = url_to_fs(url, options)
    pairs = np.load(io.BytesIO(fs.cat_file(path)), allow_pickle=False).reshape(-1, 2)
    return [(int(a), int(b)) for a, b in pairs]
