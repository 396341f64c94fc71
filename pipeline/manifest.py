"""Manifests (parquet, CSV, JSONL; a file, a directory or a glob; any fsspec URL): their files.

The driver never reads rows: it lists the files, reads their metadata (size, ETag or mtime,
parquet footers) and plans shards from row counts (`pipeline/plan.py`); shard tasks read their
own row ranges. CSV/JSONL (and formats registered in `pipeline/plan_convert.py`) are converted
to parquet under `OUT/_plan/` first, by Ray tasks (`Manifest.convert`), once per file version.
Files of a directory or glob are taken in sorted path order, so "manifest row N" means the
same row on every run. Relative media paths are resolved against the manifest file's folder.
`Manifest.batches()` still streams rows, for tools and tests; the job does not use it.

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
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as ds
import pyarrow.json as pajson
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from pyarrow.fs import FSSpecHandler, PyFileSystem

from pipeline.config import COLUMN_ALIASES, ManifestConfig
from pipeline.plan import PlanFile, ReadSpec, ShardPlan, ShardPlanner, resolve_source  # noqa: F401
from pipeline.storage import url_to_fs
from pipeline.untrusted import configured_roots, default_roots, redact_text, redact_url

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


def _format_of(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise ManifestError(f"manifest {path}: unknown format {ext!r}; use .parquet, .csv or .jsonl")
    return FORMATS[ext]


class Manifest:
    """One manifest (possibly many files) of one kind, ready to stream."""

    def __init__(self, url: str, kind: str, cfg: ManifestConfig, storage_options: dict[str, Any],
                 plan_root: str | None = None):
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
        self.source_column, self.caption_column = self._columns()
        # More columns each shard task needs (clip spans, `manifest.extra_columns`), in order.
        self.extra_names: list[str] = []
        self.rows_streamed: dict[str, int] = {}  # per file, once `batches()` has read it whole
        self.storage_options = storage_options
        # Where CSV/JSONL conversions live (`OUT/_plan`); None: they cannot be planned.
        self.plan_root = plan_root
        self._records: list[dict[str, Any]] | None = None  # file_records(), metadata only
        self.read_urls: dict[str, str] = {}  # file -> the parquet a task reads (itself or its conversion)
        # Seals signed media URLs in this run's conversions (plan_convert.py): memory only.
        self.seal_key = os.urandom(32)

    def file_records(self) -> list[dict[str, Any]]:
        """Path, size, ETag or mtime, and row count of every file, in manifest order: what
        `dataset.json` records and a rerun compares. Metadata only: parquet footers, and for
        CSV/JSONL the footer of their conversion under `OUT/_plan/` (rows None until converted)."""
        from pipeline.resume import file_record

        if self._records is None:
            params = self.cfg.redact_query_params  # a presigned manifest URL is stored redacted

            def record(path: str) -> dict[str, Any]:
                try:
                    rec = file_record(self.fs, path, redact_url(self._display(path), params), None)
                except (OSError, ValueError) as exc:
                    raise ManifestError(f"manifest file {self._display(path)} cannot be read: {exc}") from exc
                rec["rows"] = self._footer_rows(path, rec)
                return rec

            with ThreadPoolExecutor(16) as pool:  # object stores: one round trip each, overlapped
                self._records = list(pool.map(record, self.files))
        streamed = self.rows_streamed
        return [dict(rec, rows=streamed.get(path) if rec["rows"] is None else rec["rows"])
                for rec, path in zip(self._records, self.files)]

    def _url(self, path: str) -> str:
        return path if self.local else self.fs.unstrip_protocol(path)

    def _footer_rows(self, path: str, rec: dict[str, Any]) -> int | None:
        if self.format == "parquet":
            self.read_urls[path] = self._url(path)
            try:
                with self.fs.open(path, "rb") as f:
                    meta = pq.ParquetFile(f).metadata
            except (OSError, pa.ArrowException) as exc:
                raise ManifestError(
                    f"manifest file {self._display(path)}: its parquet footer cannot be read ({exc}); "
                    "restore or rewrite the file, or remove it from the manifest"
                ) from exc
            self._check_columns(path, meta.schema.to_arrow_schema().names)
            return meta.num_rows
        if self.plan_root is None:
            return None
        from pipeline.plan_convert import conversion_url, converted_rows

        self.read_urls[path] = conversion_url(self.plan_root, rec, self.format)
        return converted_rows(self.read_urls[path], self.storage_options)

    def _check_columns(self, path: str, names: list[str]) -> None:
        missing = [c for c in (self.source_column, self.caption_column, *self.extra_names) if c not in names]
        if missing:
            raise ManifestError(
                f"manifest {self._display(path)} has no column {missing[0]!r} "
                "(every file of a manifest needs the same columns)"
            )

    def convert(self) -> None:
        """Convert the footer-less files not converted yet (one Ray task each) and record their
        row counts. Parquet manifests need nothing."""
        from pipeline.plan_convert import convert_all

        if self.format == "parquet":
            return
        # Every file goes to a task: one whose conversion exists returns its footer's count
        # at once, unless it was sealed by another run's key (then it is converted again).
        todo = list(zip(self.files, self.file_records()))
        if self.plan_root is None:
            raise ManifestError(f"manifest {self.shown}: {self.format} files need an output to convert into")
        jobs = [(self.format, self._url(path), self.read_urls[path]) for path, _ in todo]
        try:
            counts = convert_all(jobs, self.storage_options, self.cfg.batch_rows, self.source_column,
                                 tuple(self.cfg.redact_query_params), self.seal_key)
        except Exception as exc:  # a Ray task error wraps the reader's message
            detail = redact_text(str(exc).strip().splitlines()[-1][:500], self.cfg.redact_query_params)
            raise ManifestError(
                f"manifest {self.shown}: a {self.format} file cannot be converted to parquet: {detail}; "
                "fix the file (every row needs the same columns)"
            ) from None
        assert self._records is not None
        by_path = dict(zip(self.files, self._records))
        for (path, _), rows in zip(todo, counts):
            by_path[path]["rows"] = rows
            fs, target = url_to_fs(self.read_urls[path], self.storage_options)
            with fs.open(target, "rb") as f:  # its footer: every file needs the manifest's columns
                self._check_columns(path, pq.ParquetFile(f).schema_arrow.names)

    def count_rows(self) -> int | None:
        """Row count from metadata (footers, conversions); None while a file is unconverted."""
        counts = [r["rows"] for r in self.file_records()]
        return None if None in counts else sum(counts)

    def plan_files(self) -> list[PlanFile]:
        """The planner's view: every file with what to read and its row count."""
        out = []
        for path, rec in zip(self.files, self.file_records()):
            if rec["rows"] is None:
                raise ManifestError(f"manifest file {rec['path']} has no known row count; convert it first")
            base = (os.path.dirname(os.path.abspath(path)) if self.local
                    else posixpath.dirname(self.fs.unstrip_protocol(path)))
            out.append(PlanFile(rec["path"], self.read_urls[path], base, int(rec["rows"])))
        return out

    def read_spec(self) -> ReadSpec:
        return ReadSpec(self.kind, self.source_column, self.caption_column, tuple(self.extra_names),
                        self.local, dict(self.storage_options), tuple(self.cfg.redact_query_params),
                        self.cfg.batch_rows, self.seal_key if self.format != "parquet" else None)

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
            detail = redact_text(f"{type(exc).__name__}: {exc}", self.cfg.redact_query_params)
            raise ManifestError(f"manifest {self.shown} cannot be read: {detail}") from exc
        if not files:
            raise ManifestError(
                f"manifest {self.shown}: no such file, or no .parquet/.csv/.jsonl files match"
            )
        return files

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
        first = self.files[0]
        if self.format not in ("parquet", "csv", "json"):  # a registered converter's rows: as configured
            return getattr(self.cfg, KIND_COLUMN[self.kind]), self.cfg.caption_column
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
        folder = (os.path.dirname(os.path.abspath(base)) if self.local
                  else posixpath.dirname(self.fs.unstrip_protocol(base)))
        return resolve_source(value, folder, self.local)

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
