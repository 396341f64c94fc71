"""Resume that verifies: which manifest files a run was planned from, and what a rerun may do.

Shard N holds rows N*S..N*S+S-1 of the concatenated manifest files (in sorted path order). If a
recorded file changes, shrinks or disappears, every later shard would silently hold other rows
than its commit marker claims, so a rerun stops and names the file and the first affected shard.
Files added after the last recorded one are incremental: their rows only extend the manifest,
so only new shards are needed, plus the old last shard when it was partial (redone whole).

`dataset.json` records, per kind, every file's path, size, ETag (object stores) or mtime, and
its row count when the format has a footer (parquet); CSV/JSONL counts are recorded as the run
streams them.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from typing import Any


def _timestamp(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, _dt.datetime):
        return value.timestamp()
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def file_record(fs, path: str, display: str, rows: int | None) -> dict[str, Any]:
    """What a rerun compares for one manifest file (one metadata call, no read)."""
    info = fs.info(path)
    etag = info.get("ETag") or info.get("etag")
    mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or info.get("created")
    return dict(path=display, size=int(info.get("size") or 0),
                etag=str(etag).strip('"') if etag else None, mtime=_timestamp(mtime), rows=rows)


def _same(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """None when `new` is the file `old` recorded, else what changed."""
    if old.get("size") != new.get("size"):
        return f"its size changed ({old.get('size')} -> {new.get('size')} bytes)"
    if old.get("etag") and new.get("etag"):
        return None if old["etag"] == new["etag"] else f"its ETag changed ({old['etag']} -> {new['etag']})"
    if old.get("mtime") is not None and new.get("mtime") is not None and old["mtime"] != new["mtime"]:
        return "its modification time changed"
    if old.get("rows") is not None and new.get("rows") is not None and old["rows"] != new["rows"]:
        return f"its row count changed ({old['rows']} -> {new['rows']})"
    return None


@dataclass
class FileCheck:
    """The outcome of comparing a kind's recorded manifest files with today's."""

    change: str | None = None  # why the output no longer matches the manifest
    changed_file: str | None = None
    first_shard: int | None = None  # first shard whose rows moved (None: unknown row counts)
    appended: list[str] = field(default_factory=list)  # files after the last recorded one
    redo: set[int] = field(default_factory=set)  # the old partial last shard, redone whole

    def message(self, kind: str, out: str) -> str:
        shard = (f"shard {self.first_shard:06d} and every later {kind} shard"
                 if self.first_shard is not None else f"an unknown number of {kind} shards")
        return (f"manifest file {self.changed_file} {self.change} since {out} was written: {shard} "
                "would hold other rows than committed. Restore the file, write to another --out, or "
                "pass --overwrite to start again")


def compare(old: list[dict[str, Any]], new: list[dict[str, Any]], samples_per_shard: int) -> FileCheck:
    """Recorded files `old` against today's `new`, in manifest order."""
    check = FileCheck()
    rows_before: int | None = 0
    for i, before in enumerate(old):
        now = new[i] if i < len(new) else None
        if now is None or now["path"] != before["path"]:
            check.changed_file = before["path"]
            check.change = ("no longer exists or no longer matches the manifest glob" if now is None
                            or before["path"] not in {f["path"] for f in new}
                            else f"is no longer at position {i} (a file sorts before it now: {now['path']})")
        else:
            why = _same(before, now)
            if why:
                check.changed_file, check.change = before["path"], why
        if check.change:
            check.first_shard = rows_before // samples_per_shard if rows_before is not None else None
            return check
        known = rows_before is not None and before.get("rows") is not None
        rows_before = rows_before + before["rows"] if known else None
    check.appended = [f["path"] for f in new[len(old):]]
    if check.appended and rows_before is not None and rows_before % samples_per_shard:
        check.redo = {rows_before // samples_per_shard}
    elif check.appended and rows_before is None:
        check.change = ("was extended by new files, but the recorded files' row counts are unknown "
                        "(the last run stopped before counting them)")
        check.changed_file = new[len(old)]["path"]
    return check
