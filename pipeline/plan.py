"""Shard plans as descriptions: the driver cuts file metadata, the shard task reads its rows.

The driver never reads a manifest row. It knows each file's row count (parquet footers; CSV,
JSONL and other registered formats once converted to parquet, `pipeline/plan_convert.py`) and
cuts the concatenated files into `ShardPlan`s: kind, index, first_row and the (file, row range)
`Piece`s it covers (a shard may straddle files). That is O(files) of state, whatever the rows.

`ShardPlan.materialize()`, the first thing `ShardTask.run` does, reads only those ranges (the
parquet row groups that overlap them, streamed in batches, then sliced), resolves relative
media paths against the ORIGINAL manifest file's folder, redacts signatures and fills the
fields the shard code uses: `sources` (as stored, redacted: the keys hash these), `captions`,
`fetch_urls` (position -> the real URL, for redacted rows only), `columns` (the extra manifest
columns named by `Manifest.extra_names`, as read) and `duplicate_of` (position -> the earlier
manifest row with the same source, from the dedupe pass, `pipeline/dedupe.py`).

Everything a task needs travels in the plan: a small `ReadSpec` (column names, storage options,
redaction), the pieces and a path to its duplicate list. No Manifest object, no row data.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.clips import ClipSpec
from pipeline.storage import url_to_fs
from pipeline.untrusted import redact_url


class PlanError(ValueError):
    """A planned file cannot be read as planned; the message names the file and what to do."""


@dataclass(frozen=True)
class ReadSpec:
    """What reading a manifest's rows needs, besides the pieces: small and picklable."""

    kind: str  # "videos" | "images"
    source_column: str
    caption_column: str
    extra_names: tuple[str, ...] = ()
    local: bool = True  # relative media paths resolve as local paths (else as URLs)
    storage_options: dict[str, Any] = field(default_factory=dict)
    redact_params: tuple[str, ...] = ()
    batch_rows: int = 65_536
    seal_key: bytes | None = None  # opens the sealed real URLs of converted files (plan_convert.py)
    # Clip spans and source template (pipeline/clips.py, `Manifest.clips`): with a template the
    # source column is the template's first column and the media value is the filled template.
    clips: ClipSpec = field(default_factory=ClipSpec)


@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of one manifest file."""

    file: str  # the manifest file as recorded in dataset.json (signatures redacted)
    read: str  # the parquet to read: the file itself, or its conversion under OUT/_plan/
    base: str  # the original file's folder: relative media paths resolve against it
    start: int
    stop: int


@dataclass
class ShardPlan:
    """One shard: rows first_row .. first_row+rows-1 of the concatenated manifest files.

    On the driver it is only a description (`pieces`); `materialize()` fills the row fields."""

    kind: str  # "videos" | "images"
    index: int
    first_row: int
    pieces: tuple[Piece, ...] = ()
    spec: ReadSpec | None = None
    roots: tuple[str, ...] = ()  # folders local rows may resolve into (`Manifest.roots`)
    duplicates: str | None = None  # URL of this shard's (row, first row) list, from the dedupe pass
    # Filled by `materialize()` in the shard task:
    sources: list[str | None] = field(default_factory=list)  # as stored: signatures redacted
    captions: list[Any] = field(default_factory=list)
    # position in this shard -> the earlier manifest row with the same source (any shard)
    duplicate_of: dict[int, int] = field(default_factory=dict)
    # position -> the URL to download, for rows whose stored source was redacted
    fetch_urls: dict[int, str] = field(default_factory=dict)
    # More manifest columns of these rows, by name, as read (`Manifest.extra_names`): parquet
    # lists stay lists, CSV values are strings. Clip spans and `manifest.extra_columns` read here.
    columns: dict[str, list[Any]] = field(default_factory=dict)
    column_types: dict[str, Any] = field(default_factory=dict)  # their Arrow types in the manifest
    materialized: bool = False

    @property
    def rows(self) -> int:
        return sum(p.stop - p.start for p in self.pieces)

    @property
    def clips(self) -> ClipSpec:
        """How these rows name clips (`ReadSpec.clips`; none for a plan without a spec)."""
        return self.spec.clips if self.spec is not None else ClipSpec()

    def materialize(self) -> ShardPlan:
        """Read this shard's rows (once) into the row fields; returns self."""
        if self.materialized or self.spec is None:
            return self
        spec = self.spec
        values = read_columns(spec, self.pieces, (spec.source_column, spec.caption_column, *spec.extra_names))
        self.sources, self.fetch_urls = stored_sources(spec, values)
        self.captions = values[1]
        self.columns = {name: values[2 + i] for i, name in enumerate(spec.extra_names)}
        self.column_types = {name: values.types.get(name) for name in spec.extra_names}
        if self.duplicates:
            from pipeline.dedupe import read_duplicates

            self.duplicate_of = {row - self.first_row: first
                                 for row, first in read_duplicates(self.duplicates, spec.storage_options)}
        self.materialized = True
        return self

    def identity(self, pos: int) -> str:
        """What makes two rows one sample (the dedupe pass compares these across the dataset):
        the stored source's key; with clip spans, of the source and the row's span values
        (InternVid has a row per clip of one video: those are not repeats)."""
        return self.clips.identity(self.sources[pos], self.columns, pos)

    def commit_fields(self) -> dict[str, Any]:
        """What the stats json records so a rerun can verify this shard: the (file, row range)
        pieces and a digest of the stored sources."""
        digest = hashlib.sha256("\n".join(s or "" for s in self.sources).encode("utf-8")).hexdigest()
        return dict(pieces=[dict(file=p.file, start=p.start, stop=p.stop) for p in self.pieces],
                    sources_digest=digest[:32])


def resolve_source(value: Any, base: str, local: bool) -> str | None:
    """A manifest cell -> the media URI: relative paths resolve against the manifest's folder."""
    if value is None:
        return None
    value = str(value).strip()
    if not value:
        return None
    if value.startswith("file://"):  # one spelling per file: the key hashes the source
        value = value[len("file://"):]
    if "://" in value or value.startswith("/"):
        return value
    if local:
        return os.path.normpath(os.path.join(base, value))
    return posixpath.join(base, value)


def stored_sources(spec: ReadSpec, values: Columns) -> tuple[list[str | None], dict[int, str]]:
    """(sources as stored, {position: URL to download} for the redacted ones) from the media
    column `values[0]`: resolved against each row's manifest folder, signatures redacted."""
    sources, fetch_urls = [], {}
    for pos, (value, base) in enumerate(zip(values[0], values.bases)):
        resolved = resolve_source(value, base, spec.local)
        stored = resolved if resolved is None else redact_url(resolved, spec.redact_params)
        sources.append(stored)
        if resolved != stored:
            fetch_urls[pos] = resolved
    return sources, fetch_urls


class Columns(list):
    """Column values (a list per requested column) plus, per row, its piece's `base`, and the
    Arrow type of each column in the manifest (`types`, by name)."""

    bases: list[str]
    types: dict[str, Any]


def open_parquet(url: str, options: dict[str, Any]) -> pq.ParquetFile:
    fs, path = url_to_fs(url, options)
    try:
        # Small read blocks: a task reads a few row groups, not object stores' 50 MB readahead.
        return pq.ParquetFile(fs.open(path, "rb", block_size=1 << 22))
    except (OSError, pa.ArrowException) as exc:
        raise PlanError(f"manifest file {url} cannot be read as planned ({exc}); it changed or was "
                        "removed since the job started: rerun the job") from exc


def read_columns(spec: ReadSpec, pieces: tuple[Piece, ...], names: tuple[str, ...]) -> Columns:
    """The values of `names` for the rows of `pieces`, in order, reading only the row groups
    that overlap each range, `spec.batch_rows` at a time."""
    out = Columns([] for _ in names)
    out.bases, out.types = [], {}
    for piece in pieces:
        pf = open_parquet(piece.read, spec.storage_options)
        missing = [c for c in names if c not in pf.schema_arrow.names]
        if missing:
            raise PlanError(f"manifest {piece.file} has no column {missing[0]!r} "
                            "(every file of a manifest needs the same columns)")
        for name in names:
            out.types.setdefault(name, pf.schema_arrow.field(name).type)
        from pipeline.plan_convert import SEALED, unseal

        sealed = SEALED in pf.schema_arrow.names and spec.seal_key is not None
        wanted = [*names, SEALED] if sealed else list(names)
        # A source template: the media value is filled from the template's columns, read too.
        templated = spec.clips.template is not None and names[:1] == (spec.source_column,)
        template = spec.clips.fields if templated else ()
        wanted += [f for f in template if f not in wanted]
        groups, offset, first = [], 0, None
        for i in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(i).num_rows
            if offset < piece.stop and offset + n > piece.start:
                groups.append(i)
                first = offset if first is None else first
            offset += n
        if offset < piece.stop:
            raise PlanError(f"manifest file {piece.file} has {offset} rows, fewer than planned "
                            f"({piece.stop}); it changed since the job started: rerun the job")
        at = first or 0  # row of the file at the start of the next batch
        try:
            for batch in pf.iter_batches(batch_size=spec.batch_rows, row_groups=groups, columns=wanted):
                lo, hi = max(piece.start - at, 0), min(piece.stop - at, batch.num_rows)
                if hi > lo:
                    part = batch.slice(lo, hi - lo)
                    for i in range(len(names)):
                        col = part.column(i)
                        if i == 0 and template:
                            values = [spec.clips.source(v) for v in part.select(list(template)).to_pylist()]
                        else:
                            if i == 0:  # the media column: any type, as text
                                col = pc.cast(col, pa.string())
                            values = col.to_pylist()
                        if i == 0 and sealed:  # the real URL of a redacted cell, into memory only
                            for j, blob in enumerate(part.column(len(names)).to_pylist()):
                                if blob is not None:
                                    values[j] = unseal(spec.seal_key, blob)
                        out[i].extend(values)
                at += batch.num_rows
                if at >= piece.stop:
                    break
        except (OSError, pa.ArrowException) as exc:
            raise PlanError(f"manifest file {piece.file} cannot be read: {exc}") from exc
        finally:
            pf.close()
        out.bases.extend([piece.base] * (piece.stop - piece.start))
    return out


@dataclass(frozen=True)
class PlanFile:
    """One manifest file as the planner sees it: recorded name, what to read, row count."""

    file: str
    read: str
    base: str
    rows: int


def cut(files: list[PlanFile], size: int, start_row: int = 0) -> Iterator[tuple[int, int, tuple[Piece, ...]]]:
    """(index, first_row, pieces) of every block of `size` rows of the concatenated files, from
    the block holding `start_row`; the last block may be short. O(files) state."""
    index, first, pieces, filled = 0, 0, [], 0
    for f in files:
        at = 0
        while at < f.rows:
            take = min(size - filled, f.rows - at)
            pieces.append(Piece(f.file, f.read, f.base, at, at + take))
            at, filled = at + take, filled + take
            if filled == size:
                if first + size > start_row:
                    yield index, first, tuple(pieces)
                index, first, pieces, filled = index + 1, first + size, [], 0
    if pieces:
        yield index, first, tuple(pieces)


class ShardPlanner:
    """Cut a manifest's files (metadata only) into `ShardPlan` descriptions of
    `samples_per_shard` rows; nothing is read until a plan is materialized."""

    def __init__(self, manifest: Any, samples_per_shard: int):
        self.manifest = manifest
        self.size = samples_per_shard

    def run(self) -> Iterator[ShardPlan]:
        m = self.manifest
        spec = m.read_spec()
        for index, first, pieces in cut(m.plan_files(), self.size):
            yield ShardPlan(m.kind, index, first, pieces, spec, roots=m.roots)
