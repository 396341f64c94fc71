"""WebDataset tars as input (video2dataset / img2dataset output): `--videos`/`--images` TARS.

A tar is indexed once, reading headers only, into a table of rows in tar order: one row per
input sample (members grouped the webdataset way, `dir/KEY.ext`), with
- `source` = `TAR_URL#KEY` (the sample key hashes it), `caption` = the `.txt` member,
- per kind, `_wds_videos` / `_wds_images` (+ `_at`, `_size`, `_n`): the first media member of
  that kind (mp4/webm/mkv/avi/mov; jpg/jpeg/png/webp), where its bytes lie inside the tar, and
  how many there are, so one index serves `--videos` and `--images`,
- `_wds_meta`: the `.json` member (video2dataset/img2dataset's own record), which becomes
  `source_meta` in `KEY.json`,
- `_wds_reason`, `_wds_detail`: why the sample cannot be used (no caption, a link or `..`
  name, bad JSON...).
`convert_tar` is the "tar" converter of `pipeline/plan_convert.py`: one Ray task per tar writes
that table as parquet under `OUT/_plan/convert/` before any shard, and the planner cuts shards
from its row counts like any manifest file. The columns travel to the shard task as extra
manifest columns (`ShardPlan.columns`); `TarRows` fails unusable rows there before any read
(also no, two or an empty media member of the task's kind) and reads just the media member's
bytes by offset and size (`read_member`: a local seek, an fsspec range read, or an HTTP Range
request through the guarded client), after `SourcePolicy.check` of the tar (docs/untrusted.md).

Tars come from strangers: plain tar only (never decompressed), pax/GNU long-name headers
capped (`core.shards.tar`), `.txt`/`.json` members read only up to `MAX_TEXT_BYTES`, media
members never read here (their size is checked against `http.max_bytes` at fetch), at most
`MAX_SAMPLES` samples per tar, and a tar that ends early or has a bad header past the first is
refused whole (tarfile would stop there quietly). A file that is not a tar is a
`TarInputError` naming it.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from core.shard_format import SampleError
from core.shards.tar import COMPRESSED_MAGIC, ShardError, _CappedTarInfo, check_plain_tar, split_name
from pipeline.untrusted import SourcePolicy

MEDIA = {"videos": ("mp4", "webm", "mkv", "avi", "mov"), "images": ("jpg", "jpeg", "png", "webp")}
MAX_TEXT_BYTES = 1 << 20  # a caption or a sample's JSON record; img2dataset's are < 10 kB
INDEX_BLOCK_BYTES = 1 << 20  # remote read size while indexing: s3fs reads 50 MB per seek otherwise
MAX_SAMPLES = 1 << 21  # per tar: video2dataset writes 10k-100k, img2dataset 10k
KINDS = tuple(MEDIA)
# Per kind: the first media member of that kind (name, data offset, size) and how many there are,
# so one conversion of a tar serves --videos and --images alike.
MEDIA_COLUMNS = tuple(f"_wds_{k}{suffix}" for k in KINDS for suffix in ("", "_at", "_size", "_n"))
COLUMNS = (*MEDIA_COLUMNS, "_wds_meta", "_wds_reason", "_wds_detail")
SCHEMA = pa.schema(
    [("source", pa.string()), ("caption", pa.string())]
    + [(c, pa.string() if c.endswith(KINDS) else pa.int64()) for c in MEDIA_COLUMNS]
    + [("_wds_meta", pa.string()), ("_wds_reason", pa.string()), ("_wds_detail", pa.string())]
)


class TarInputError(ValueError):
    """A tar input cannot be read at all (not a tar, compressed, corrupt); names the file."""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


@dataclass
class _Sample:
    key: str
    media: dict[str, list[tuple[str, int, int]]] = field(default_factory=lambda: {k: [] for k in KINDS})
    caption: str | None = None
    meta: str | None = None
    problem: tuple[str, str] | None = None  # (reason, detail), the first one found

    def fail(self, reason: str, detail: str) -> None:
        self.problem = self.problem or (reason, detail)


@dataclass
class _Index:
    tar_url: str
    rows: dict[str, list[Any]] = field(default_factory=lambda: {n: [] for n in SCHEMA.names})

    def add(self, s: _Sample) -> None:
        if s.problem is None and s.caption is None and any(s.media.values()):
            s.fail("bad_caption", f"{self.tar_url}: sample {s.key!r} has no .txt member (its caption)")
        values: list[Any] = [f"{self.tar_url}#{s.key}", s.caption]
        for kind in KINDS:
            first = s.media[kind][0] if s.media[kind] else (None, None, None)
            values += [*first, len(s.media[kind])]
        values += [s.meta, *(s.problem or (None, None))]
        for column, value in zip(SCHEMA.names, values):
            self.rows[column].append(value)

    def table(self) -> pa.Table:
        return pa.table(self.rows, schema=SCHEMA)


def _read_text(tar: tarfile.TarFile, info: tarfile.TarInfo, sample: _Sample, where: str) -> str | None:
    if info.size > MAX_TEXT_BYTES:
        sample.fail("bad_caption" if info.name.lower().endswith(".txt") else "decode_error",
                    f"{where}: {info.name} is {info.size} bytes, over {MAX_TEXT_BYTES}")
        return None
    data = tar.extractfile(info).read(info.size)
    if len(data) != info.size:
        raise ShardError(f"{info.name}: unexpected end of data")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        sample.fail("bad_caption", f"{where}: {info.name} is not UTF-8 text")
        return None


def _take(tar: tarfile.TarFile, info: tarfile.TarInfo, ext: str, sample: _Sample, index: _Index) -> None:
    """One member of `sample`: note the media member's place, read the caption and the JSON."""
    where = f"{index.tar_url}: sample {sample.key!r}"
    parts = info.name.split("/")
    if info.name.startswith("/") or ".." in parts:  # never extracted, but a stranger's name
        sample.fail("forbidden_path", f"{where}: member name {info.name!r} is absolute or has '..'")
        return
    kind = next((k for k in KINDS if ext in MEDIA[k]), None)
    if kind is None and ext not in ("txt", "json"):
        return  # other members (`.cls`, `.npy`, ...) are skipped unread
    if not info.isreg() or info.issparse():
        sample.fail("forbidden_path", f"{where}: member {info.name!r} is a link or special file")
        return
    if kind is not None:  # its bytes are read by the shard task, by offset and size
        sample.media[kind].append((info.name, info.offset_data, info.size))
        return
    text = _read_text(tar, info, sample, where)
    if text is None:
        return
    if ext == "txt":
        if sample.caption is not None:
            sample.fail("bad_caption", f"{where}: two .txt members (captions)")
        sample.caption = text
        return
    if sample.meta is not None:
        sample.fail("decode_error", f"{where}: two .json members")
    try:
        record = json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:
        sample.fail("decode_error", f"{where}: {info.name} is not valid JSON ({exc})")
        return
    if not isinstance(record, dict):
        sample.fail("decode_error", f"{where}: {info.name} is not a JSON object")
        return
    sample.meta = json.dumps(record, ensure_ascii=False, separators=(",", ":"))


def index_tar(fileobj: IO[bytes], tar_url: str) -> pa.Table:
    """Rows of one tar (see the module doc), in tar order. `fileobj` must be seekable: media
    members are seeked over, so the cost is the headers plus the `.txt`/`.json` members.
    Raises TarInputError (naming `tar_url`) when it is not a readable plain tar."""
    index, sample = _Index(tar_url), None
    count = 0
    try:
        check_plain_tar(fileobj)
        with tarfile.open(fileobj=fileobj, mode="r:", tarinfo=_CappedTarInfo) as tar:
            for info in tar:
                tar.members.clear()  # tarfile keeps every header otherwise
                if info.isdir():
                    continue
                key, ext = split_name(info.name)
                if sample is None or key != sample.key:
                    if sample is not None:
                        index.add(sample)
                    count += 1
                    if count > MAX_SAMPLES:
                        raise ShardError(f"more than {MAX_SAMPLES} samples; split it into smaller tars")
                    sample = _Sample(key)
                _take(tar, info, ext, sample, index)
            _check_end(fileobj, tar.offset)
    except (ShardError, tarfile.TarError, EOFError) as exc:
        raise TarInputError(f"{tar_url} is not a readable plain tar: {exc}") from None
    if sample is not None:
        index.add(sample)
    return index.table()


def _check_end(fileobj: IO[bytes], offset: int) -> None:
    """tarfile ends quietly at a bad header past the first one, or at a truncated member: both
    would drop the samples after them without a word, so check the archive really ended."""
    size = fileobj.seek(0, 2)
    if offset > size:
        raise ShardError(f"truncated: its last member runs past the end of the file ({size} bytes)")
    fileobj.seek(offset)
    if fileobj.read(2 * tarfile.BLOCKSIZE).strip(b"\0"):
        raise ShardError(f"invalid tar header at byte {offset}")


def index_tar_file(fs: Any, path: str, tar_url: str) -> pa.Table:
    """`index_tar` of `path` on fsspec filesystem `fs`; storage errors become TarInputError."""
    try:
        # Small read blocks: each header skipped to is one range read, not a 5 MB readahead.
        with fs.open(path, "rb", block_size=INDEX_BLOCK_BYTES) as fh:
            return index_tar(fh, tar_url)
    except TarInputError:
        raise
    except OSError as exc:
        raise TarInputError(f"{tar_url} cannot be read: {type(exc).__name__}: {exc}") from None


def brace_files(fs: Any, path: str) -> tuple[list[str], list[str]]:
    """(files, the missing ones) of `s3://b/v2d/{00000..00999}.tar` (webdataset's brace
    expansion), in brace order; one listing per folder, not one request per file."""
    from braceexpand import braceexpand

    strip = fs._strip_protocol
    files = [strip(f) for f in braceexpand(path)]
    if "http" in fs.protocol or "https" in fs.protocol:  # no listings on the web: opening tells
        return files, []
    listed: set[str] = set()
    for folder in sorted({posixpath.dirname(f) for f in files}):
        if fs.isdir(folder):
            listed.update(strip(p) for p in fs.ls(folder, detail=False))
    return files, [f for f in files if f not in listed]


def drop_tar_sidecars(files: list[str]) -> list[str]:
    """A folder's files without what video2dataset/img2dataset write beside each tar
    (`00000_stats.json`, `00000.parquet`): those are not manifests. Anything else stays, so a
    parquet manifest next to tars is still a 'mixes formats' error, not silently ignored."""
    stems = {f[: -len(".tar")] for f in files if f.lower().endswith(".tar")}
    if not stems:
        return files

    def sidecar(f: str) -> bool:
        stem = posixpath.splitext(f)[0]
        return not f.lower().endswith(".tar") and (stem in stems or stem.removesuffix("_stats") in stems)

    return [f for f in files if not sidecar(f)]


def check_tar_head(fs: Any, path: str, shown: str) -> None:
    """A cheap up-front check (one 512-byte read): `path` starts like a plain tar, so a wrong or
    compressed file fails before any work starts. Corruption further in surfaces while planning."""
    try:
        with fs.open(path, "rb") as fh:
            head = fh.read(tarfile.BLOCKSIZE)
    except OSError as exc:
        raise TarInputError(f"tar input {shown} cannot be read: {type(exc).__name__}: {exc}") from None
    for magic, name in COMPRESSED_MAGIC.items():
        if head.startswith(magic):
            raise TarInputError(f"tar input {shown} is {name}-compressed; pass plain .tar shards")
    try:
        tarfile.TarInfo.frombuf(head, tarfile.ENCODING, "surrogateescape")
    except tarfile.HeaderError as exc:
        raise TarInputError(f"tar input {shown} is not a tar ({exc}); pass WebDataset .tar shards") from None


def check_tar_heads(fs: Any, files: list[str], shown: list[str]) -> None:
    """`check_tar_head` of every file, 8 at once (object stores: one round trip each); the first
    bad file in manifest order raises."""
    with ThreadPoolExecutor(8, thread_name_prefix="tar-head") as pool:
        for _ in pool.map(lambda a: check_tar_head(fs, *a), zip(files, shown)):
            pass


def convert_tar(fs: Any, path: str, sink: Any, batch_rows: int) -> None:
    """The "tar" converter of `pipeline/plan_convert.py`: one tar's index -> one parquet file
    (a Ray task per tar, before any shard; reused while the tar is unchanged)."""
    tar_url = path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)
    table = index_tar_file(fs, path, tar_url)
    with pq.ParquetWriter(sink, SCHEMA, compression="zstd") as writer:
        writer.write_table(table, row_group_size=batch_rows)


# ------------------------------------------------------------------------- the shard task's side


@dataclass(frozen=True)
class MemberRef:
    """Where one input sample's media bytes lie: `size` bytes at `offset` of tar `url`."""

    url: str  # the tar's real URL or local path (a signed URL stays in memory only)
    offset: int
    size: int
    shown: str  # `TAR_URL#KEY` as stored (redacted), for messages
    policy: SourcePolicy


class TarRows:
    """The tar-input columns of one `ShardPlan`, if it has them (otherwise every call is a no-op,
    so parquet/CSV/JSONL manifests run exactly as before)."""

    def __init__(self, plan: Any):
        self.on = all(c in plan.columns for c in COLUMNS)
        self.columns, self.sources, self.kind = plan.columns, plan.sources, plan.kind

    def _media(self, pos: int) -> tuple[str | None, int, int, int]:
        k = f"_wds_{self.kind}"
        return tuple(self.columns[k + suffix][pos] for suffix in ("", "_at", "_size", "_n"))

    def failure(self, pos: int) -> tuple[str, str, str] | None:
        """Why row `pos` cannot be used (the index's verdict: no caption, a link...; or no, two
        or an empty media member of this kind), as a failed result; None if it can."""
        if not self.on:
            return None
        if self.columns["_wds_reason"][pos] is not None:
            return ("failed", self.columns["_wds_reason"][pos], self.columns["_wds_detail"][pos] or "")
        name, _, size, count = self._media(pos)
        where = f"{self.sources[pos]}: input sample"
        if count == 0:
            exts = "/".join(MEDIA[self.kind])
            return ("failed", "missing_file", f"{where} has no media member ({exts}) for --{self.kind}")
        if count > 1:
            return ("failed", "decode_error", f"{where} has {count} media members; which one is meant?")
        if size == 0:
            return ("failed", "empty_file", f"{where}: {name} is empty (0 bytes)")
        return None

    def target(self, pos: int, stored: str, fetch: str, policy: SourcePolicy) -> MemberRef | str:
        """What to fetch for row `pos`: its media member, or `fetch` itself for other inputs.
        `stored`/`fetch` are `TAR_URL#KEY` as stored and as downloaded (unredacted)."""
        if not self.on:
            return fetch
        name, offset, size, _ = self._media(pos)
        key = split_name(name)[0]
        # The source is f"{tar_url}#{key}" (a key may hold "#"; the manifest strips whitespace).
        tar_url = fetch[: -len(key) - 1] if fetch.endswith("#" + key) else fetch.rsplit("#", 1)[0]
        return MemberRef(tar_url, offset, size, stored, policy)

    def annotate(self, pos: int, decoded: Any) -> None:
        """Put the sample's own JSON record into its `KEY.json`, as `source_meta`."""
        if self.on and self.columns["_wds_meta"][pos] is not None:
            decoded.meta["source_meta"] = json.loads(self.columns["_wds_meta"][pos])


def read_member(ref: MemberRef, filesystem: Any, max_bytes: int, http: Any) -> bytes:
    """The media member's bytes: the tar is checked against the policy right before it is opened
    (a local tar swapped for a symlink meanwhile is refused), then `size` bytes are read at
    `offset`: `http(url, (offset, size))` for http(s) (the fetcher's guarded client: address
    checks, deadline, retries), `filesystem(url)` (fsspec) for s3/gs/..., a seek for a local
    tar. SampleError on failure."""
    ref.policy.check(ref.url)
    if ref.size > max_bytes:
        raise SampleError("download_error", f"{ref.shown}: {ref.size} bytes, over http.max_bytes={max_bytes}")
    if ref.url.startswith(("http://", "https://")):
        data = http(ref.url, (ref.offset, ref.size))
        if len(data) != ref.size:
            raise SampleError("download_error", f"{ref.shown}: {len(data)} bytes, asked for {ref.size}")
        return data
    try:
        if "://" in ref.url:
            data = filesystem(ref.url).cat_file(ref.url, start=ref.offset, end=ref.offset + ref.size)
        else:
            with open(ref.url, "rb") as fh:
                fh.seek(ref.offset)
                data = fh.read(ref.size)
    except FileNotFoundError:
        raise SampleError("missing_file", f"{ref.shown}: the tar is gone (no such file)") from None
    except Exception as exc:  # noqa: BLE001 - any storage failure is this sample's failure
        raise SampleError("download_error", f"{ref.shown}: {type(exc).__name__}: {exc}") from None
    if len(data) != ref.size:
        raise SampleError("download_error", f"{ref.shown}: tar truncated ({len(data)} of {ref.size} bytes)")
    return data

