"""Manifests (parquet, CSV, JSONL; a file, a directory or a glob; any fsspec URL), streamed.

Only two columns are read (media and caption), in Arrow batches of `manifest.batch_rows`:
the driver never holds more than one batch plus the shards in flight, whatever the row count.
Files of a directory or glob are read in sorted path order, so "manifest row N" means the
same row on every run. Relative media paths are resolved against the manifest file's folder.

Rows come from strangers (docs/untrusted.md): each source is stored with its signatures
redacted (`pipeline.untrusted.redact_url`; the key hashes that form) and the URL to download
travels separately in `ShardPlan.fetch_urls`. `Manifest.roots` are the folders its local rows
may resolve into (`manifest.allowed_roots`; the shard task checks each row before reading it).

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
from pipeline.untrusted import configured_roots, default_roots, redact_text, redact_url
from pipeline.wds_input import COLUMNS as TAR_COLUMNS
from pipeline.wds_input import TarIndexer, TarInputError, brace_files, drop_tar_sidecars

FORMATS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".jsonl": "json",
    ".json": "json",
    ".ndjson": "json",
    ".tar": "tar",  # WebDataset shards (video2dataset / img2dataset output): pipeline/wds_input.py
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
    sources: list[str | None]  # as stored: signatures redacted (the keys hash these)
    captions: list[Any]
    # position in this shard -> the earlier manifest row with the same source (any shard)
    duplicate_of: dict[int, int] = field(default_factory=dict)
    # position -> the URL to download, for rows whose stored source was redacted
    fetch_urls: dict[int, str] = field(default_factory=dict)
    roots: tuple[str, ...] = ()  # folders local rows may resolve into (`Manifest.roots`)
    # More manifest columns of these rows, by name, as read (`Manifest.extra_names`): parquet
    # lists stay lists, CSV values are strings. Clip spans and `manifest.extra_columns` read here.
    columns: dict[str, list[Any]] = field(default_factory=dict)


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
        raise ManifestError(f"manifest {path}: unknown format {ext!r}; use .parquet, .csv, .jsonl or .tar")
    return FORMATS[ext]


class Manifest:
    """One manifest (possibly many files) of one kind, ready to stream."""

    def __init__(self, url: str, kind: str, cfg: ManifestConfig, storage_options: dict[str, Any]):
        self.url = url
        self.shown = redact_url(url, cfg.redact_query_params)  # for messages: no signatures
        self.kind = kind
        self.cfg = cfg
        self.fs, path = url_to_fs(url, storage_options)
        self.local = isinstance(self.fs, LocalFileSystem)
        self.files = self._files(path)
        self.roots = self._roots(path)
        formats = {_format_of(f) for f in self.files}
        if len(formats) > 1:
            raise ManifestError(
                f"manifest {url} mixes formats {sorted(formats)}; use one format per manifest"
            )
        self.format = formats.pop()
        if self.format == "tar":
            urls = [f if self.local else self.fs.unstrip_protocol(f) for f in self.files]
            self._tars = TarIndexer(self.fs, self.files, urls, kind)
            self._tar_call(self._tars.check_heads, [self._display(f) for f in self.files])
        self.source_column, self.caption_column = self._columns()
        # More columns each shard task needs (clip spans, `manifest.extra_columns`), in order.
        self.extra_names: list[str] = list(TAR_COLUMNS) if self.format == "tar" else []
        self.rows_streamed: dict[str, int] = {}  # per file, once `batches()` has read it whole

    def file_records(self) -> list[dict[str, Any]]:
        """Path, size, ETag or mtime, and row count (parquet footers; CSV/JSONL once streamed) of
        every file, in manifest order: what `dataset.json` records and a rerun compares."""
        from pipeline.resume import file_record

        def rows(path: str) -> int | None:
            if path in self.rows_streamed:
                return self.rows_streamed[path]
            return self._dataset(path).count_rows() if self.format == "parquet" else None

        params = self.cfg.redact_query_params  # a presigned manifest URL is stored redacted
        return [file_record(self.fs, p, redact_url(self._display(p), params), rows(p)) for p in self.files]

    def _files(self, path: str) -> list[str]:
        try:
            web = self.url.startswith(("http://", "https://"))  # "?" starts a query, not a glob
            if "{" in path:
                files = self._brace_files(path)
            elif not web and any(ch in path for ch in "*?["):
                files = sorted(self.fs.glob(path))
            elif self.fs.isdir(path):
                files = sorted(f for f in self.fs.find(path) if os.path.splitext(f)[1].lower() in FORMATS)
                files = drop_tar_sidecars(files)  # a tar's _stats.json and .parquet are no manifests
            elif self.fs.exists(path):
                files = [path]
            else:
                files = []
        except ManifestError:
            raise
        except (OSError, ValueError) as exc:
            detail = redact_text(f"{type(exc).__name__}: {exc}", self.cfg.redact_query_params)
            raise ManifestError(f"manifest {self.shown} cannot be read: {detail}") from exc
        if not files:
            raise ManifestError(
                f"manifest {self.shown}: no such file, or no .parquet/.csv/.jsonl/.tar files match"
            )
        return files

    def _brace_files(self, path: str) -> list[str]:
        files, missing = brace_files(self.fs, path)
        if missing:
            raise ManifestError(f"manifest {self.shown}: {len(missing)} of {len(files)} files of the "
                                f"brace pattern do not exist, first {self._display(missing[0])}")
        return files

    def _tar_call(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except TarInputError as exc:
            raise ManifestError(redact_text(str(exc), self.cfg.redact_query_params)) from None

    def _roots(self, path: str) -> tuple[str, ...]:
        """`manifest.allowed_roots`, or by default a local manifest's folder (none if remote)."""
        if self.cfg.allowed_roots is not None:
            try:
                return configured_roots(self.cfg.allowed_roots)
            except ValueError as exc:
                raise ManifestError(f"{exc}; list existing folders (or [] for no local files)") from None
        if not self.local:
            return ()
        return default_roots(path, self.fs.isdir(path), self.files)

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
        if self.format == "tar":
            return ds.dataset(self._tar_call(self._tars.table, path))
        fs = None if self.local else PyFileSystem(FSSpecHandler(self.fs))
        try:
            return ds.dataset(path, format=self._file_format(column_names), filesystem=fs)
        except (OSError, pa.ArrowException) as exc:
            raise ManifestError(f"manifest {self._display(path)} cannot be read: {exc}") from exc

    def _display(self, path: str) -> str:
        return (
            path if self.local else redact_url(self.fs.unstrip_protocol(path), self.cfg.redact_query_params)
        )

    def _columns(self) -> tuple[str, str]:
        """Configured column names, falling back to known aliases (LAION `URL`, `TEXT`)."""
        if self.format == "tar":  # the index's own columns: source `TAR#KEY`, caption `KEY.txt`
            return "source", "caption"
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
        """(sources as stored, captions) in manifest order, one Arrow batch at a time."""
        for sources, captions, _, _ in self.resolved_batches():
            yield sources, captions

    def resolved_batches(
        self,
    ) -> Iterator[tuple[list[str | None], list[Any], dict[int, str], dict[str, list[Any]]]]:
        """(sources as stored, captions, {position in batch: URL to download}, {extra column:
        values}) in manifest order; the dict of URLs holds only the rows whose stored source had
        something redacted, the extra columns are `extra_names`."""
        columns = (self.source_column, self.caption_column, *self.extra_names)
        params = self.cfg.redact_query_params
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
                    resolved = [
                        self._resolve(path, s) for s in pc.cast(batch.column(0), pa.string()).to_pylist()
                    ]
                    stored = [s if s is None else redact_url(s, params) for s in resolved]
                    secret = {i: r for i, (r, s) in enumerate(zip(resolved, stored)) if r != s}
                    extra = {name: batch.column(2 + i).to_pylist() for i, name in enumerate(self.extra_names)}
                    rows += len(resolved)
                    yield stored, batch.column(1).to_pylist(), secret, extra
            except pa.ArrowException as exc:
                raise ManifestError(f"manifest {self._display(path)} cannot be read: {exc}") from exc
            self.rows_streamed[path] = rows


class ShardPlanner:
    """Cut a manifest stream into `ShardPlan`s of `samples_per_shard` rows."""

    def __init__(self, manifest: Manifest, samples_per_shard: int):
        self.manifest = manifest
        self.size = samples_per_shard

    def _plan(self, index: int, sources: list, captions: list, secret: dict[int, str],
              columns: dict[str, list[Any]]) -> ShardPlan:
        first = index * self.size
        fetch_urls = {r - first: secret[r] for r in range(first, first + len(sources)) if r in secret}
        return ShardPlan(
            self.manifest.kind,
            index,
            first,
            sources,
            captions,
            fetch_urls=fetch_urls,
            roots=self.manifest.roots,
            columns=columns,
        )

    def run(self) -> Iterator[ShardPlan]:
        index, sources, captions = 0, [], []
        extra: dict[str, list[Any]] = {name: [] for name in self.manifest.extra_names}
        secret: dict[int, str] = {}  # manifest row -> URL to download (redacted rows only)
        row = 0  # manifest row of sources[0]
        for batch_sources, batch_captions, batch_secret, batch_extra in self.manifest.resolved_batches():
            secret.update({row + len(sources) + i: url for i, url in batch_secret.items()})
            sources.extend(batch_sources)
            captions.extend(batch_captions)
            for name, values in batch_extra.items():
                extra[name].extend(values)
            start = 0
            while len(sources) - start >= self.size:
                end = start + self.size
                columns = {name: values[start:end] for name, values in extra.items()}
                yield self._plan(index, sources[start:end], captions[start:end], secret, columns)
                start, index = end, index + 1
            sources, captions, row = sources[start:], captions[start:], row + start
            extra = {name: values[start:] for name, values in extra.items()}
            secret = {r: url for r, url in secret.items() if r >= row}
        if sources:
            yield self._plan(index, sources, captions, secret, extra)
