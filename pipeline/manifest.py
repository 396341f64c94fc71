"""Manifests (parquet, CSV, JSONL; a file, a directory or a glob; any fsspec URL), streamed.

Only two columns are read (media and caption), in Arrow batches of `manifest.batch_rows`:
the driver never holds more than one batch plus the shards in flight, whatever the row count.
Files of a directory or glob are read in sorted path order, so "manifest row N" means the
same row on every run. Relative media paths are resolved against the manifest file's folder.

`open_manifest` checks everything that can be checked up front (the files exist and parse,
the columns are there) and raises `ManifestError` naming the file and the config field.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as ds
import pyarrow.json as pajson
from fsspec.implementations.local import LocalFileSystem
from pyarrow.fs import FSSpecHandler, PyFileSystem

from pipeline.config import COLUMN_ALIASES, ManifestConfig
from pipeline.storage import url_to_fs

FORMATS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".jsonl": "json",
    ".json": "json",
    ".ndjson": "json",
}
KIND_COLUMN = {"videos": "video_column", "images": "image_column"}


class ManifestError(ValueError):
    """A manifest cannot be used; the message names the file/column and what to do."""


@dataclass
class ShardPlan:
    """The manifest rows of one shard: rows first_row .. first_row+len(sources)-1."""

    kind: str  # "videos" | "images"
    index: int
    first_row: int
    sources: list[str | None]
    captions: list[Any]
    # position in this shard -> the earlier manifest row with the same source (any shard)
    duplicate_of: dict[int, int] = field(default_factory=dict)


class SeenSources:
    """The first manifest row of every source key seen so far, across all shards.

    A repeated source must fail as `duplicate` even when its first row sits in another shard
    (same key twice in a dataset). 16 bytes per row (64-bit key digest + row) in sorted numpy
    arrays, merged from a small dict every `merge_at` new keys: 10M rows stay near 160 MB.
    """

    def __init__(self, merge_at: int = 1 << 18):
        self.digests = np.empty(0, np.uint64)
        self.rows = np.empty(0, np.int64)
        self.pending: dict[int, int] = {}
        self.merge_at = merge_at

    def first_row(self, key: str, row: int) -> int | None:
        """The earlier row of this key, or None (and remember `row` as its first)."""
        digest = int(key[:16], 16)
        if digest in self.pending:
            return self.pending[digest]
        i = int(np.searchsorted(self.digests, np.uint64(digest)))
        if i < len(self.digests) and int(self.digests[i]) == digest:
            return int(self.rows[i])
        self.pending[digest] = row
        if len(self.pending) >= self.merge_at:
            self._merge()
        return None

    def _merge(self) -> None:
        new = np.fromiter(self.pending.keys(), np.uint64, len(self.pending))
        digests = np.concatenate([self.digests, new])
        rows = np.concatenate([self.rows, np.fromiter(self.pending.values(), np.int64, len(new))])
        order = np.argsort(digests, kind="stable")
        self.digests, self.rows, self.pending = digests[order], rows[order], {}

    def mark(self, plan: ShardPlan) -> ShardPlan:
        from core.shard_format import sample_key

        for pos, source in enumerate(plan.sources):
            if source:
                first = self.first_row(sample_key(source), plan.first_row + pos)
                if first is not None:
                    plan.duplicate_of[pos] = first
        return plan


def _format_of(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise ManifestError(f"manifest {path}: unknown format {ext!r}; use .parquet, .csv or .jsonl")
    return FORMATS[ext]


class Manifest:
    """One manifest (possibly many files) of one kind, ready to stream."""

    def __init__(self, url: str, kind: str, cfg: ManifestConfig, storage_options: dict[str, Any]):
        self.url = url
        self.kind = kind
        self.cfg = cfg
        self.fs, path = url_to_fs(url, storage_options)
        self.local = isinstance(self.fs, LocalFileSystem)
        self.files = self._files(path)
        formats = {_format_of(f) for f in self.files}
        if len(formats) > 1:
            raise ManifestError(
                f"manifest {url} mixes formats {sorted(formats)}; use one format per manifest"
            )
        self.format = formats.pop()
        self.source_column, self.caption_column = self._columns()
        self.rows_streamed: dict[str, int] = {}  # per file, once `batches()` has read it whole

    def file_records(self) -> list[dict[str, Any]]:
        """Path, size, ETag or mtime, and row count (parquet footers; CSV/JSONL once streamed) of
        every file, in manifest order: what `dataset.json` records and a rerun compares."""
        from pipeline.resume import file_record

        def rows(path: str) -> int | None:
            if path in self.rows_streamed:
                return self.rows_streamed[path]
            return self._dataset(path).count_rows() if self.format == "parquet" else None

        return [file_record(self.fs, p, self._display(p), rows(p)) for p in self.files]

    def _files(self, path: str) -> list[str]:
        try:
            web = self.url.startswith(("http://", "https://"))  # "?" starts a query, not a glob
            if not web and any(ch in path for ch in "*?["):
                files = sorted(self.fs.glob(path))
            elif self.fs.isdir(path):
                files = sorted(f for f in self.fs.find(path) if os.path.splitext(f)[1].lower() in FORMATS)
            elif self.fs.exists(path):
                files = [path]
            else:
                files = []
        except (OSError, ValueError) as exc:
            raise ManifestError(f"manifest {self.url} cannot be read: {type(exc).__name__}: {exc}") from exc
        if not files:
            raise ManifestError(f"manifest {self.url}: no such file, or no .parquet/.csv/.jsonl files match")
        return files

    def _file_format(self, column_names: tuple[str, ...] = ()) -> ds.FileFormat | str:
        if self.format == "csv":
            # Read the columns we need as text: type inference must not turn a caption into a
            # number in one block and fail on the next.
            return ds.CsvFileFormat(
                convert_options=pacsv.ConvertOptions(
                    column_types={c: pa.string() for c in column_names}, strings_can_be_null=True
                )
            )
        if self.format == "json":
            return ds.JsonFileFormat(read_options=pajson.ReadOptions(block_size=1 << 24))
        return "parquet"

    def _dataset(self, path: str, column_names: tuple[str, ...] = ()) -> ds.Dataset:
        fs = None if self.local else PyFileSystem(FSSpecHandler(self.fs))
        try:
            return ds.dataset(path, format=self._file_format(column_names), filesystem=fs)
        except (OSError, pa.ArrowException) as exc:
            raise ManifestError(f"manifest {self._display(path)} cannot be read: {exc}") from exc

    def _display(self, path: str) -> str:
        return path if self.local else self.fs.unstrip_protocol(path)

    def _columns(self) -> tuple[str, str]:
        """Configured column names, falling back to known aliases (LAION `URL`, `TEXT`)."""
        first = self.files[0]
        try:
            names = set(self._dataset(first).schema.names)
        except pa.ArrowException as exc:
            raise ManifestError(f"manifest {self._display(first)} cannot be read: {exc}") from exc
        chosen = []
        for field_name in (KIND_COLUMN[self.kind], "caption_column"):
            wanted = getattr(self.cfg, field_name)
            found = next((c for c in (wanted, *COLUMN_ALIASES[field_name]) if c in names), None)
            if found is None:
                columns = ", ".join(sorted(names))
                raise ManifestError(
                    f"manifest {self._display(first)} has no column {wanted!r} (columns: {columns}); "
                    f"set manifest.{field_name}=NAME to the right column"
                )
            chosen.append(found)
        return chosen[0], chosen[1]

    def _resolve(self, base: str, value: Any) -> str | None:
        if value is None:
            return None
        value = str(value).strip()
        if not value:
            return None
        if value.startswith("file://"):  # one spelling per file: the key hashes the source
            value = value[len("file://") :]
        if "://" in value or value.startswith("/"):
            return value
        if self.local:
            return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(base)), value))
        return self.fs.unstrip_protocol(posixpath.join(posixpath.dirname(base), value))

    def count_rows(self) -> int | None:
        """Row count when it is cheap (parquet footers); None for CSV/JSONL (would need a scan)."""
        if self.format != "parquet":
            return None
        return sum(self._dataset(path).count_rows() for path in self.files)

    def batches(self) -> Iterator[tuple[list[str | None], list[Any]]]:
        """(sources, captions) in manifest order, one Arrow batch at a time."""
        columns = (self.source_column, self.caption_column)
        for path in self.files:
            dataset = self._dataset(path, columns)
            missing = [c for c in columns if c not in dataset.schema.names]
            if missing:
                raise ManifestError(
                    f"manifest {self._display(path)} has no column {missing[0]!r} "
                    "(every file of a manifest needs the same columns)"
                )
            rows = 0
            try:
                for batch in dataset.to_batches(
                    columns=list(columns),
                    batch_size=self.cfg.batch_rows,
                    batch_readahead=1,
                    fragment_readahead=1,
                ):
                    sources = pc.cast(batch.column(0), pa.string()).to_pylist()
                    captions = batch.column(1).to_pylist()
                    rows += len(sources)
                    yield [self._resolve(path, s) for s in sources], captions
            except pa.ArrowException as exc:
                raise ManifestError(f"manifest {self._display(path)} cannot be read: {exc}") from exc
            self.rows_streamed[path] = rows


class ShardPlanner:
    """Cut a manifest stream into `ShardPlan`s of `samples_per_shard` rows."""

    def __init__(self, manifest: Manifest, samples_per_shard: int):
        self.manifest = manifest
        self.size = samples_per_shard

    def run(self) -> Iterator[ShardPlan]:
        index, sources, captions = 0, [], []
        for batch_sources, batch_captions in self.manifest.batches():
            sources.extend(batch_sources)
            captions.extend(batch_captions)
            start = 0
            while len(sources) - start >= self.size:
                end = start + self.size
                yield ShardPlan(
                    self.manifest.kind, index, index * self.size, sources[start:end], captions[start:end]
                )
                start, index = end, index + 1
            sources, captions = sources[start:], captions[start:]
        if sources:
            yield ShardPlan(self.manifest.kind, index, index * self.size, sources, captions)
