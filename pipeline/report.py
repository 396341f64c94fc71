"""Dataset report over a preprocessing output (docs/shard-format.md): what a dataset looks like, as files
a person can open.

    python -m pipeline.report OUT [--out REPORT_DIR] [--workers 8]

OUT is a local path or any fsspec URL (`s3://bucket/prefix`). Writes `index.html`,
`report.md`, `summary.json` and PNG plots (default REPORT_DIR: `OUT/report`).

Counts come from the status parquet of committed shards (those whose `NNNNNN.json` exists);
distributions come from the tar shards, reading only the small members (`.json`,
`.motion.npy`, `.appearance.npy`). The latents are never read: a tar opened in random-access
mode seeks over member payloads, so a dataset of millions of clips costs a few KB per clip.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any

import fsspec
import numpy as np
import pyarrow.parquet as pq

from core.shards import ShardError, iter_samples, load_npy

KINDS = ("videos", "images")
SMALL_MEMBERS = ("json", "motion.npy", "appearance.npy")
# Small range reads on object stores: the default multi-MB readahead would pull the latents
# we are trying to skip.
REMOTE_BLOCK_SIZE = 1 << 16


@dataclass
class ShardResult:
    """What one committed shard contributes to the report."""

    name: str
    status: Counter = field(default_factory=Counter)  # ok / failed
    reasons: Counter = field(default_factory=Counter)  # failure reason code -> count
    samples: int = 0  # samples found in the tar
    unreadable: Counter = field(default_factory=Counter)  # "KEY.member: why" problems by kind
    motion_raw: list[np.ndarray] = field(default_factory=list)
    motion_mean: list[float] = field(default_factory=list)
    appearance_factor: list[float] = field(default_factory=list)
    frames: list[int] = field(default_factory=list)
    span_seconds: list[float] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)  # the shard's own NNNNNN.json


@dataclass
class KindReport:
    """All committed shards of one kind (`videos` or `images`), merged."""

    kind: str
    shards: int = 0
    incomplete_shards: list[str] = field(default_factory=list)
    status: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)
    samples: int = 0
    unreadable: Counter = field(default_factory=Counter)
    motion_raw: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    motion_mean: np.ndarray = field(default_factory=lambda: np.zeros(0))
    appearance_factor: np.ndarray = field(default_factory=lambda: np.zeros(0))
    frames: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    span_seconds: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def rows(self) -> int:
        return sum(self.status.values())

    def pearson(self) -> float:
        """Pearson r between per-clip mean motion and γa (paper Fig. 10); NaN if undefined."""
        x, y = self.motion_mean, self.appearance_factor
        if len(x) < 2 or np.std(x) == 0 or np.std(y) == 0:
            return float("nan")
        return float(np.corrcoef(x, y)[0, 1])

    def summary(self) -> dict[str, Any]:
        def stats(a: np.ndarray) -> dict[str, float] | None:
            if a.size == 0:
                return None
            return {
                "mean": float(a.mean()),
                "std": float(a.std()),
                "min": float(a.min()),
                "median": float(np.median(a)),
                "max": float(a.max()),
            }

        return {
            "shards": self.shards,
            "incomplete_shards": self.incomplete_shards,
            "rows": self.rows,
            "status": dict(sorted(self.status.items())),
            "reasons": dict(self.reasons.most_common()),
            "samples_in_tars": self.samples,
            "unreadable_members": dict(self.unreadable.most_common()),
            "motion_raw": stats(self.motion_raw),
            "motion_mean_per_clip": stats(self.motion_mean),
            "appearance_factor": stats(self.appearance_factor),
            "frames": stats(self.frames.astype(np.float64)),
            "span_seconds": stats(self.span_seconds),
            "pearson_motion_appearance": self.pearson(),
            "clips_with_factors": int(len(self.motion_mean)),
        }


def iter_small_members(fileobj: IO[bytes]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample of a webdataset tar, reading only SMALL_MEMBERS.

    Read through the shard format's one reader (`core.shards.iter_samples`): `fileobj` must
    be seekable, members not asked for (the latents) are seeked over, never read, and the
    plain-tar and member-size limits apply (a refused member is simply absent).
    """
    for raw in iter_samples(fileobj, wanted=SMALL_MEMBERS):
        yield raw.key.rsplit("/", 1)[-1], raw.members


def clip_length(meta: dict[str, Any], motion: np.ndarray | None) -> tuple[int | None, float | None]:
    """(frames, source span in seconds) from a video sample's KEY.json."""
    indices = meta.get("frame_indices") or meta.get("frames")
    frames = len(indices) if isinstance(indices, list) else (len(motion) + 1 if motion is not None else None)
    fps = meta.get("native_fps") or meta.get("fps")
    span = None
    if isinstance(indices, list) and indices and fps:
        span = (int(indices[-1]) - int(indices[0]) + 1) / float(fps)
    return frames, span


def _add_sample(result: ShardResult, key: str, members: dict[str, bytes]) -> None:
    result.samples += 1
    try:
        meta = json.loads(members["json"]) if "json" in members else {}
        motion = load_npy(members["motion.npy"]) if "motion.npy" in members else None
        appearance = load_npy(members["appearance.npy"]) if "appearance.npy" in members else None
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        result.unreadable[f"{type(exc).__name__}"] += 1
        print(f"report: {result.name} sample {key}: unreadable member ({exc})", file=sys.stderr)
        return
    if motion is not None and appearance is not None:
        if motion.ndim != 1 or appearance.shape != (len(motion) + 1,) * 2:
            result.unreadable["bad_shape"] += 1
            print(
                f"report: {result.name} sample {key}: motion {motion.shape} / appearance "
                f"{appearance.shape} do not agree",
                file=sys.stderr,
            )
            return
        result.motion_raw.append(motion.astype(np.float32))
        result.motion_mean.append(float(motion.mean()))
        result.appearance_factor.append(float(1.0 - appearance[0, -1]))
        frames, span = clip_length(meta, motion)
        if frames is not None:
            result.frames.append(frames)
        if span is not None:
            result.span_seconds.append(span)


def summarize_shard(fs: fsspec.AbstractFileSystem, root: str, kind: str, name: str) -> ShardResult:
    """Status counts from NAME.parquet and small-member statistics from NAME.tar."""
    result = ShardResult(name=f"{kind}/{name}")
    base = f"{root}/{kind}/{name}"
    with fs.open(f"{base}.json", "rb") as f:
        result.stats = json.loads(f.read())
    with fs.open(f"{base}.parquet", "rb") as f:
        table = pq.read_table(f, columns=["status", "reason"]).to_pydict()
    for status, reason in zip(table["status"], table["reason"]):
        result.status[status] += 1
        if status != "ok":
            result.reasons[reason or "unknown"] += 1
    if fs.exists(f"{base}.tar"):
        try:
            with fs.open(f"{base}.tar", "rb", block_size=REMOTE_BLOCK_SIZE) as f:
                for key, members in iter_small_members(f):
                    _add_sample(result, key, members)
        except ShardError as exc:  # compressed, corrupt or truncated: report it, go on
            result.unreadable["bad_shard"] += 1
            print(f"report: {result.name}.tar: {exc}", file=sys.stderr)
    return result


def _shard_names(fs: fsspec.AbstractFileSystem, root: str, kind: str) -> tuple[list[str], list[str]]:
    """(committed shard names, incomplete shard names): a shard counts once its .json exists."""
    if not fs.exists(f"{root}/{kind}"):
        return [], []
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(f"{root}/{kind}", detail=False)}
    stems = {n.split(".", 1)[0] for n in names if n.endswith((".tar", ".parquet", ".json"))}
    done = sorted(s for s in stems if f"{s}.json" in names and f"{s}.parquet" in names)
    return done, sorted(stems - set(done))


def collect(out: str, workers: int = 8) -> tuple[dict[str, KindReport], dict[str, Any]]:
    """Read a preprocessing output; returns ({kind: KindReport}, dataset.json or {})."""
    fs, root = fsspec.core.url_to_fs(out)
    root = root.rstrip("/")
    if not fs.exists(root):
        raise FileNotFoundError(f"preprocessing output {out} does not exist; pass the --out of pipeline.prep")
    dataset: dict[str, Any] = {}
    if fs.exists(f"{root}/dataset.json"):
        with fs.open(f"{root}/dataset.json", "rb") as f:
            dataset = json.loads(f.read())
    reports = {}
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for kind in KINDS:
            done, incomplete = _shard_names(fs, root, kind)
            rep = KindReport(kind=kind, shards=len(done), incomplete_shards=incomplete)
            parts = list(pool.map(lambda n, k=kind: summarize_shard(fs, root, k, n), done))
            for part in parts:
                rep.status.update(part.status)
                rep.reasons.update(part.reasons)
                rep.unreadable.update(part.unreadable)
                rep.samples += part.samples
            rep.motion_raw = np.concatenate([m for p in parts for m in p.motion_raw] or [rep.motion_raw])
            rep.motion_mean = np.array([v for p in parts for v in p.motion_mean], np.float64)
            rep.appearance_factor = np.array([v for p in parts for v in p.appearance_factor], np.float64)
            rep.frames = np.array([v for p in parts for v in p.frames], np.int64)
            rep.span_seconds = np.array([v for p in parts for v in p.span_seconds], np.float64)
            reports[kind] = rep
    if not any(r.shards or r.incomplete_shards for r in reports.values()):
        raise FileNotFoundError(
            f"{out} has no shards in videos/ or images/ (docs/shard-format.md): not a pipeline.prep output?"
        )
    return reports, dataset


def write_report(out: str, report_dir: str | None = None, workers: int = 8) -> str:
    """Collect, plot and write the report; returns the URL of index.html."""
    from pipeline.report_html import render

    reports, dataset = collect(out, workers)
    target = report_dir or f"{out.rstrip('/')}/report"
    fs, root = fsspec.core.url_to_fs(target)
    fs.makedirs(root, exist_ok=True)
    files = render(reports, dataset, source=out)
    summary = {kind: rep.summary() for kind, rep in reports.items()}
    files["summary.json"] = json.dumps({"source": out, "kinds": summary}, indent=2, default=str).encode()
    for name, data in files.items():
        with fs.open(f"{root.rstrip('/')}/{name}", "wb") as f:
            f.write(data)
    return f"{target.rstrip('/')}/index.html"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="preprocessing output root (local path or fsspec URL)")
    parser.add_argument("--out", dest="report_dir", default=None, help="report dir (default OUT/report)")
    parser.add_argument("--workers", type=int, default=8, help="shards read in parallel (I/O bound)")
    args = parser.parse_args(argv)
    try:
        index = write_report(args.out, args.report_dir, args.workers)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"report written: {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
