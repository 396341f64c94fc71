"""Writing one shard: a deterministic tar, the status parquet and the stats json (docs/shard-format.md).

The tar is written with `tarfile` rather than `webdataset.TarWriter`: TarWriter re-sorts each
sample's members by extension and stamps `time.time()` and user "bigdata" into the headers
unless told otherwise; here members follow manifest row order, then `SampleRecord.members()`
order, and every header has mtime 0, uid/gid 0, empty owner names and mode 0o444, so
identical inputs give byte-identical tars. The tar streams to a temp file as rows resolve:
memory holds one encode batch, not a shard.
"""

from __future__ import annotations

import io
import tarfile
import time
from collections import Counter
from collections.abc import Iterator
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from core.shards import FORMAT_VERSION, STATUS_FIELDS, ShardError, iter_samples, shard_name, split_name
from pipeline.statistics import FactorLog
from pipeline.storage import OutputStore, json_bytes

STATUS_SCHEMA = pa.schema([(name, getattr(pa, type_name)()) for name, type_name in STATUS_FIELDS])


def status_type(manifest_type: pa.DataType | None) -> pa.DataType | None:
    """The status column type of a manifest extra column: its own, except for values the status
    table holds as text (bytes as hex, dates and decimals as strings, as in KEY.json)."""
    t = manifest_type
    if t is None or pa.types.is_null(t):
        return None
    if (pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t)
            or pa.types.is_temporal(t) or pa.types.is_decimal(t)):
        return pa.string()
    return t


def status_table(rows: list[dict[str, Any]], extra_types: dict[str, Any] | None = None) -> pa.Table:
    """The status parquet: the fixed columns typed as `STATUS_FIELDS`, then any other fields
    the rows carry (manifest extra columns), typed from the manifest (`extra_types`) so every
    shard's table has one schema, even where a shard's values are all null."""
    extra = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in STATUS_SCHEMA.names]
    extra += [k for k in (extra_types or {}) if k not in extra and k not in STATUS_SCHEMA.names]
    columns = {name: pa.array([r.get(name) for r in rows], type=STATUS_SCHEMA.field(name).type)
               for name in STATUS_SCHEMA.names}
    for name in extra:
        values, wanted = [r.get(name) for r in rows], status_type((extra_types or {}).get(name))
        try:
            columns[name] = pa.array(values, type=wanted)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
            columns[name] = pa.array(values)  # values the manifest type cannot hold: as they are
    return pa.table(columns)


Members = list[tuple[str, bytes]]


def tar_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class ShardWriter:
    """Accepts rows in manifest order (`add_ok` / `add_failed`), then `commit()`s."""

    def __init__(self, store: OutputStore, kind: str, index: int,
                 extra_types: dict[str, Any] | None = None):
        """`extra_types`: the manifest's Arrow type of each `manifest.extra_columns` column."""
        self.store = store
        self.extra_types = extra_types or {}
        self.kind = kind
        self.index = index
        self.name = shard_name(index)
        self.tmp_tar = store.tmp_path(f"{kind}-{self.name}.tar")
        store.makedirs()
        self._file: IO[bytes] = store.fs.open(self.tmp_tar, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self.rows: list[dict[str, str | None]] = []
        self.reasons: Counter = Counter()
        self.ok = 0
        self.sample_bytes = 0
        self.factors = FactorLog()  # per-clip factors for dataset.json's statistics

    def add_ok(self, key: str, source: str, caption: str, members: Members, **fields: Any) -> None:
        """`fields`: more status columns of this row (`STATUS_FIELDS` past `detail`, extras)."""
        for name, data in members:
            self._tar.addfile(tar_info(name, len(data)), io.BytesIO(data))
            self.sample_bytes += len(data)
        self.factors.add(members)
        self.ok += 1
        self.rows.append(
            dict(fields, key=key, source=source, caption=caption, status="ok", reason=None, detail=None)
        )

    def add_failed(
        self, key: str, source: str, caption: str, reason: str, detail: str, **fields: Any
    ) -> None:
        self.reasons[reason] += 1
        self.rows.append(
            dict(fields, key=key, source=source, caption=caption, status="failed", reason=reason,
                 detail=detail)
        )

    def abort(self) -> None:
        try:
            self._tar.close()
            self._file.close()
        finally:
            self.store.fs.rm_file(self.tmp_tar)

    def commit(self, extra: dict[str, Any]) -> dict[str, Any]:
        """Publish tar, then parquet, then the stats json (the commit marker). Returns the stats."""
        self._tar.close()
        self._file.close()
        tar_bytes = self.store.fs.size(self.tmp_tar)
        table = status_table(self.rows, self.extra_types)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        tmp_parquet = self.store.tmp_path(f"{self.kind}-{self.name}.parquet")
        self.store.fs.pipe_file(tmp_parquet, buf.getvalue())
        stats = dict(
            extra,
            kind=self.kind,
            shard=self.name,
            rows=len(self.rows),
            ok=self.ok,
            failed=len(self.rows) - self.ok,
            reasons=dict(sorted(self.reasons.items())),
            tar_bytes=tar_bytes,
            sample_bytes=self.sample_bytes,
            format_version=FORMAT_VERSION,
            committed_at=time.time(),
        )
        factors = self.factors.to_dict()
        if factors is not None:
            stats["factors"] = factors
        self.store.publish(self.tmp_tar, self.store.shard_path(self.kind, self.index, "tar"))
        self.store.publish(tmp_parquet, self.store.shard_path(self.kind, self.index, "parquet"))
        self.store.write_atomic(self.store.shard_path(self.kind, self.index, "json"), json_bytes(stats))
        return stats


def read_status(store: OutputStore, kind: str, index: int) -> list[dict[str, Any]]:
    with store.fs.open(store.shard_path(kind, index, "parquet"), "rb") as fh:
        return pq.read_table(fh).to_pylist()


def iter_tar_samples(store: OutputStore, kind: str, index: int) -> Iterator[tuple[str, Members]]:
    """(key, members) of a committed tar, in file order, streaming (for `--retry-failed`).

    Read through the shard format's one reader (`core.shards.iter_samples`): every member is
    kept, since the shard is ours, but the plain-tar and member-size limits still hold."""
    with store.fs.open(store.shard_path(kind, index, "tar"), "rb") as fh:
        for raw in iter_samples(fh, wanted=None):
            if raw.problem:
                raise ShardError(f"{store.shard_path(kind, index, 'tar')}: {raw.detail}")
            yield raw.key, [(name, raw.members[split_name(name)[1]]) for name in raw.names]
