"""Manifest files without a footer (CSV, JSONL, ...) -> parquet under `OUT/_plan/convert/`, once.

The planner needs every file's row count and the shard tasks need to read a row range without
scanning a whole file, so a file of a footer-less format is first converted to parquet by a
Ray task (one per file, run before any shard). The conversion is keyed by the file's path, size
and ETag/mtime (`conversion_url`): a rerun reuses it, a changed file gets a new one. Relative
media paths still resolve against the ORIGINAL file's folder (the planner keeps it as the
piece's `base`; the converted file stores the cells as written).

Registry: `CONVERTERS[format]` is a function `convert(fs, path, sink, batch_rows) -> None` that
reads the manifest file `path` on the fsspec filesystem `fs` and writes ONE parquet file to the
binary file object `sink` (`write_batches` helps). Register a new input format with
`register("tar", convert, (".tar",))`: its files then list, plan, dedupe and resume like any
other manifest file. Conversions are written to a temporary name and renamed into place, so a
crashed conversion is never reused.

Signed URLs (docs/untrusted.md: the real URL is held only in memory): after conversion, a media
cell that redaction would change is stored redacted, its real value sealed (AES-GCM) in the
column `SEALED` with the job's in-memory key (`Manifest.seal_key`, random per run; the shard
task gets it in `ReadSpec.seal_key`). A file with sealed cells is therefore converted again by
the next run (signatures expire anyway); a file without any is reused as is.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from pipeline.storage import url_to_fs

SEALED = "__higen_sealed"  # real values of redacted media cells, AES-GCM under the run's key
SEALED_BY = b"higen.sealed_by"  # parquet metadata: digest of the key that sealed them
Converter = Callable[[Any, str, Any, int], None]
CONVERTERS: dict[str, Converter] = {}
CONVERT_VERSION = 1  # bump when a converter's output changes: old conversions are not reused


def register(fmt: str, convert: Converter, extensions: Iterable[str] = ()) -> None:
    """Make `fmt` a manifest format converted by `convert`; `extensions` (".tar") select it."""
    from pipeline.manifest import FORMATS

    CONVERTERS[fmt] = convert
    for ext in extensions:
        FORMATS[ext.lower()] = fmt


def write_batches(sink: Any, batches: Iterable[pa.RecordBatch], schema: pa.Schema, batch_rows: int) -> None:
    """Batches -> one parquet file in `sink`, row groups of at most `batch_rows` rows."""
    with pq.ParquetWriter(sink, schema, compression="zstd") as writer:
        for batch in batches:
            writer.write_batch(batch, row_group_size=batch_rows)


def convert_csv(fs: Any, path: str, sink: Any, batch_rows: int) -> None:
    # Every column as text, as the CSV path always read them: type inference must not turn a
    # caption into a number in one block and fail on the next. Empty cells are null.
    with fs.open(path, "rb") as f:
        names = pacsv.open_csv(f).schema.names
    options = pacsv.ConvertOptions(column_types={n: pa.string() for n in names}, strings_can_be_null=True)
    with fs.open(path, "rb") as f:
        reader = pacsv.open_csv(f, convert_options=options)
        write_batches(sink, reader, reader.schema, batch_rows)


def convert_json(fs: Any, path: str, sink: Any, batch_rows: int) -> None:
    with fs.open(path, "rb") as f:
        reader = pajson.open_json(f, read_options=pajson.ReadOptions(block_size=1 << 24))
        write_batches(sink, reader, reader.schema, batch_rows)


register("csv", convert_csv)
register("json", convert_json)


def conversion_url(plan_root: str, record: dict[str, Any], fmt: str) -> str:
    """Where the conversion of the file `record` (path, size, ETag, mtime) lives."""
    blob = json.dumps([CONVERT_VERSION, fmt, record.get("path"), record.get("size"), record.get("etag"),
                       record.get("mtime")], sort_keys=True)
    return f"{plan_root.rstrip('/')}/convert/{hashlib.sha256(blob.encode()).hexdigest()[:24]}.parquet"


def key_id(key: bytes | None) -> bytes:
    return hashlib.sha256(b"higen-seal" + (key or b"")).hexdigest()[:16].encode()


def converted_rows(url: str, options: dict[str, Any], key: bytes | None = None) -> int | None:
    """The row count of an existing conversion (its footer), or None if there is none yet, or
    if it holds cells sealed with another key than `key` (None: any key, for --dry-run)."""
    fs, path = url_to_fs(url, options)
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        meta = pq.ParquetFile(f).metadata
    sealed_by = (meta.metadata or {}).get(SEALED_BY)
    if key is not None and sealed_by and sealed_by != key_id(key):
        return None
    return meta.num_rows


def seal(raw: Any, sink: Any, column: str, params: tuple[str, ...], key: bytes, batch_rows: int) -> None:
    """Rewrite a conversion so no real value of a redacted media cell is stored in clear."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from pipeline.untrusted import redact_url

    pf, aes = pq.ParquetFile(raw), AESGCM(key)
    schema = pf.schema_arrow.append(pa.field(SEALED, pa.binary()))
    schema = schema.with_metadata({**(schema.metadata or {}), SEALED_BY: key_id(key)})
    with pq.ParquetWriter(sink, schema, compression="zstd") as writer:
        for batch in pf.iter_batches(batch_size=batch_rows):
            values = batch.column(column).to_pylist() if column in batch.schema.names else []
            stored, sealed = [], []
            for v in values:
                r = v if v is None else redact_url(str(v), params)
                nonce = os.urandom(12)
                secret = r is not None and r != str(v)
                sealed.append(nonce + aes.encrypt(nonce, str(v).encode(), None) if secret else None)
                stored.append(r if secret else v)
            arrays = [batch.column(i) if name != column else pa.array(stored, batch.schema.field(i).type)
                      for i, name in enumerate(batch.schema.names)]
            writer.write_batch(pa.record_batch([*arrays, pa.array(sealed or [None] * batch.num_rows,
                                                                  pa.binary())], schema=schema),
                               row_group_size=batch_rows)


def has_secrets(raw: Any, column: str, params: tuple[str, ...], batch_rows: int) -> bool:
    from pipeline.untrusted import redact_url

    pf = pq.ParquetFile(raw)
    if column not in pf.schema_arrow.names:
        return False
    for batch in pf.iter_batches(batch_size=batch_rows, columns=[column]):
        if any(v is not None and redact_url(str(v), params) != str(v) for v in batch.column(0).to_pylist()):
            return True
    return False


def unseal(key: bytes, blob: bytes) -> str:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(key).decrypt(blob[:12], blob[12:], None).decode()


def convert_file(fmt: str, source_url: str, target_url: str, options: dict[str, Any], batch_rows: int,
                 column: str = "", params: tuple[str, ...] = (), key: bytes | None = None) -> int:
    """Convert one file (a Ray task body); returns its row count. Reuses a finished conversion.
    With `key`, the media `column`'s redacted cells are sealed (`seal`)."""
    rows = converted_rows(target_url, options, key)
    if rows is not None:
        return rows
    src_fs, src = url_to_fs(source_url, options)
    fs, target = url_to_fs(target_url, options)
    tmp = f"{target}.tmp-{uuid.uuid4().hex[:12]}"
    if isinstance(fs, LocalFileSystem):  # object stores have no folders
        fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
    try:
        # The clear conversion stays on this worker's local temporary disk, never the output.
        with tempfile.TemporaryFile() as raw:
            CONVERTERS[fmt](src_fs, src, raw, batch_rows)
            raw.seek(0)
            secret = key is not None and has_secrets(raw, column, params, batch_rows)
            raw.seek(0)
            with fs.open(tmp, "wb") as sink:
                if secret:
                    seal(raw, sink, column, params, key, batch_rows)
                else:
                    shutil.copyfileobj(raw, sink, 1 << 22)
        fs.mv(tmp, target)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise
    return converted_rows(target_url, options) or 0


def convert_all(jobs: list[tuple[str, str, str]], options: dict[str, Any], batch_rows: int,
                column: str = "", params: tuple[str, ...] = (), key: bytes | None = None) -> list[int]:
    """[(format, source URL, target URL)] -> row counts, one Ray task per file (all at once:
    O(files) handles on the driver)."""
    import ray

    if not jobs:
        return []
    remote = ray.remote(convert_file).options(num_cpus=1, max_retries=2)
    return ray.get([remote.remote(fmt, src, dst, options, batch_rows, column, params, key)
                    for fmt, src, dst in jobs])
