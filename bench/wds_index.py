"""How much a tar input costs the planner: indexing (headers, `.txt`, `.json`) against reading
every byte, as a stock webdataset pass would, on a local disk and on S3 (moto on 127.0.0.1):

    python bench/wds_index.py [--samples 1000] [--media-kb 100] [--block-kb 1024]

Writes one video2dataset-style tar (KEY.mp4 of random bytes, KEY.txt, KEY.json) of `--samples`
samples, then prints, per place: seconds, bytes read and samples/s of `index_tar_file`, seconds of a
full sequential read, and the number of S3 range requests. moto copies a large object on every
ranged GET, so its seconds over-state S3's; the request count and bytes are what carry over.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


class Counted(io.RawIOBase):
    """Counts bytes read through a file object (local case)."""

    def __init__(self, fh):
        self.fh, self.read_bytes = fh, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.fh.seek(offset, whence)

    def tell(self) -> int:
        return self.fh.tell()

    def readinto(self, b) -> int:
        data = self.fh.read(len(b))
        b[: len(data)] = data
        self.read_bytes += len(data)
        return len(data)


def make_tar(path: Path, samples: int, media_kb: int) -> int:
    import tarfile

    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(samples):
            key = f"{i:09d}"
            members = [("mp4", os.urandom(media_kb << 10)), ("txt", f"clip {i}".encode()),
                       ("json", json.dumps({"url": f"https://example.com/{i}.mp4", "key": key}).encode())]
            for ext, data in members:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(data), 1_700_000_000
                tar.addfile(info, io.BytesIO(data))
    return path.stat().st_size


def count_range_reads() -> list[int]:
    """Sizes of the S3 range GETs s3fs makes from now on (one entry per request)."""
    import s3fs

    sizes: list[int] = []
    fetch = s3fs.core.S3File._fetch_range

    def counted(self, start: int, end: int) -> bytes:
        sizes.append(end - start)
        return fetch(self, start, end)

    s3fs.core.S3File._fetch_range = counted
    return sizes


def full_read(open_file) -> float:
    t = time.perf_counter()
    with open_file() as fh:
        while fh.read(8 << 20):
            pass
    return time.perf_counter() - t


def main() -> None:
    from pipeline.wds_input import index_tar, index_tar_file
    from testing.s3 import MotoS3

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--media-kb", type=int, default=100)
    parser.add_argument("--block-kb", type=int, default=None, help="remote read block while indexing")
    args = parser.parse_args()
    if args.block_kb:
        import pipeline.wds_input as wds_input

        wds_input.INDEX_BLOCK_BYTES = args.block_kb << 10
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "00000.tar"
        size = make_tar(path, args.samples, args.media_kb)
        with open(path, "rb") as raw:
            counted = Counted(raw)
            t = time.perf_counter()
            n = index_tar(io.BufferedReader(counted, 8 << 10), str(path)).num_rows
            local_s = time.perf_counter() - t
            rows.append(("local", local_s, counted.read_bytes, n, full_read(lambda: open(path, "rb"))))
        with MotoS3() as s3:
            fs = s3.fs()
            fs.mkdir("bench")
            fs.put_file(str(path), "bench/00000.tar")
            fs.invalidate_cache()
            ranges = count_range_reads()
            t = time.perf_counter()
            n = index_tar_file(fs, "bench/00000.tar", "s3://bench/00000.tar").num_rows
            index_s = time.perf_counter() - t
            requests, read = len(ranges), sum(ranges)
            rows.append(("s3 (moto)", index_s, read, n, full_read(lambda: fs.open("bench/00000.tar", "rb"))))
    from pipeline.wds_input import INDEX_BLOCK_BYTES

    print(f"one tar: {args.samples} samples, {args.media_kb} kB media each, {size / 1e6:.0f} MB; "
          f"remote read block {INDEX_BLOCK_BYTES >> 10} kB")
    print(f"{'where':<10} {'index s':>8} {'bytes read':>12} {'samples/s':>10} {'full read s':>12}")
    for where, seconds, read, n, full in rows:
        print(f"{where:<10} {seconds:>8.2f} {read:>12,} {n / seconds:>10,.0f} {full:>12.2f}")
    print(f"S3 range requests while indexing: {requests} ({requests / args.samples:.2f} per sample)")


if __name__ == "__main__":
    main()
