"""Reading shard tars without surprises: the one place that groups tar members into samples.

Shards may come from people you do not trust (docs/shard-format.md), so a reader here
- accepts plain (uncompressed) tar only: a gzip/bz2/xz/zstd stream is a bad shard, rejected
  from its first bytes, never decompressed (a 1.3 MB gzip "tar" once grew RSS by 605 MB);
- checks each member's size from its tar header before reading it (`max_member_bytes`), and
  caps pax / GNU long-name headers too, since tarfile reads those whole;
- reads only the member extensions asked for (format v1's by default); others (`.pyd`,
  `.pickle`, `.mp4`, ...) are skipped unread, and nothing is ever unpickled;
- groups members by key the webdataset way (`dir/KEY.ext`, KEY up to the first dot of the
  base name, consecutive members of one key form a sample).

The file object must be seekable (local files, fsspec files): members not read are seeked
over, so skipping `skip` samples or a sample's latents costs header reads only.
"""

from __future__ import annotations

import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

# Format v1 members (docs/shard-format.md); anything else in a shard is skipped unread.
KNOWN_MEMBERS = ("json", "txt", "latents.npy", "motion.npy", "appearance.npy", "text.npy")
DEFAULT_MAX_MEMBER_BYTES = 64 << 20
MAX_HEADER_BYTES = 1 << 20  # pax / GNU long-name header payloads (names, attributes)

# First bytes of compressed streams that tarfile (or a careless reader) would decompress.
COMPRESSED_MAGIC = {
    b"\x1f\x8b": "gzip",
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"\x04\x22\x4d\x18": "lz4",
    b"\x5d\x00\x00": "lzma",
}


class ShardError(Exception):
    """The shard as a whole cannot be read (not a plain tar, corrupt, truncated)."""


@dataclass
class RawSample:
    """The members of one sample, as bytes, before any validation."""

    key: str
    index: int  # position of the sample in the tar (0-based, counting every key group)
    members: dict[str, bytes] = field(default_factory=dict)  # ext -> bytes (read ones only)
    names: list[str] = field(default_factory=list)  # member names in file order (read ones)
    problem: str | None = None  # reason code when a member was refused unread
    detail: str = ""


class _CappedTarInfo(tarfile.TarInfo):
    """TarInfo that refuses oversized pax / GNU long-name headers before tarfile reads them."""

    def _proc_member(self, tarfile_obj):
        if (
            self.type
            in (
                tarfile.GNUTYPE_LONGNAME,
                tarfile.GNUTYPE_LONGLINK,
                tarfile.XHDTYPE,
                tarfile.XGLTYPE,
                tarfile.SOLARIS_XHDTYPE,
            )
            and self.size > MAX_HEADER_BYTES
        ):
            raise ShardError(f"tar extended header of {self.size} bytes exceeds {MAX_HEADER_BYTES}")
        return super()._proc_member(tarfile_obj)


def split_name(name: str) -> tuple[str, str]:
    """`dir/KEY.a.b` -> (`dir/KEY`, `a.b`), the webdataset rule; ext lower-cased."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


def check_plain_tar(fileobj: IO[bytes]) -> None:
    """Raise ShardError when the stream starts like a compressed file; rewinds after peeking."""
    start = fileobj.tell()
    head = fileobj.read(8)
    fileobj.seek(start)
    for magic, kind in COMPRESSED_MAGIC.items():
        if head.startswith(magic):
            raise ShardError(f"{kind}-compressed stream: shards must be plain tar; not decompressed")


def iter_samples(
    fileobj: IO[bytes],
    *,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    wanted: tuple[str, ...] | None = KNOWN_MEMBERS,
    skip: int = 0,
    skipped: Counter | None = None,
) -> Iterator[RawSample]:
    """Samples of a plain tar in file order; `wanted=None` reads every extension.

    The first `skip` samples are passed over without reading any member. `skipped` (if
    given) counts members left unread: `unknown_member`, `not_a_file`. Raises ShardError on
    a compressed or corrupt tar; a member over `max_member_bytes` makes its sample's
    `problem` `member_too_large` (the rest of the shard still reads).
    """
    check_plain_tar(fileobj)
    skipped = Counter() if skipped is None else skipped
    current: RawSample | None = None
    index = -1
    try:
        with tarfile.open(fileobj=fileobj, mode="r:", tarinfo=_CappedTarInfo) as tar:
            for info in tar:
                tar.members.clear()  # the index of a long shard would grow without bound
                if not info.isfile():
                    skipped["not_a_file"] += not info.isdir()
                    continue
                key, ext = split_name(info.name)
                if current is None or key != current.key:
                    if current is not None and current.index >= skip:
                        yield current
                    index += 1
                    current = RawSample(key, index)
                if index < skip:
                    continue
                if wanted is not None and ext not in wanted:
                    skipped["unknown_member"] += 1
                    continue
                if ext in current.members or current.problem == "duplicate_member":
                    current.problem, current.detail = "duplicate_member", f"{info.name} appears twice"
                    continue
                if info.size > max_member_bytes:
                    current.problem = current.problem or "member_too_large"
                    current.detail = current.detail or (
                        f"{info.name} is {info.size} bytes (tar header), "
                        f"over max_member_bytes={max_member_bytes}"
                    )
                    continue
                data = tar.extractfile(info).read(info.size)
                if len(data) != info.size:
                    raise ShardError(f"{info.name}: unexpected end of data")
                current.members[ext] = data
                current.names.append(info.name)
    except tarfile.TarError as err:
        raise ShardError(f"not a readable tar: {err}") from None
    if current is not None and current.index >= skip:
        yield current
