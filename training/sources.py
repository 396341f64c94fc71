"""Where a role's training samples come from: the complete shards of a data root, their sample
counts, what `dataset.json` says each sample must look like, and a shard reader that rides out
storage faults. Tar parsing and sample checks belong to the shard format (`core.shards`)."""

from __future__ import annotations

import json
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import fsspec

from core.shards import (
    DEFAULT_MAX_MEMBER_BYTES,
    DatasetError,
    RawSample,
    SampleSpec,
    ShardError,
    iter_samples,
)

log = logging.getLogger(__name__)
_JITTER = random.Random()  # its own generator: retries must not move the training RNG streams


class DataError(ValueError):
    """The data root cannot feed this job; the message names the path and what to do."""


@dataclass
class ShardSource:
    """The shards of one role (`video` or `image`) and the shape their samples must have."""

    urls: list[str]
    sizes: list[int]  # samples per shard (the `ok` count); a shard of size 0 is never drawn
    spec: SampleSpec


@dataclass
class ReadOptions:
    storage: dict[str, Any]
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
    retries: int = 5  # storage errors tolerated per shard before it is skipped
    backoff_s: float = 0.2  # first retry's wait; doubles each time, with +-50% jitter


def list_shards(root: str, role: str, storage: dict[str, Any] | None = None) -> list[str]:
    """Complete shards of `ROOT/{role}s/`: a tar counts only once its `.json` marker exists."""
    fs, base = fsspec.core.url_to_fs(root, **(storage or {}))
    folder = f"{base.rstrip('/')}/{role}s"
    if not fs.isdir(folder):
        raise DataError(
            f"data root {root} has no {role}s/ folder, but this job has {role} ranks; point --data at a "
            f"preprocessing output root (docs/shard-format.md) or set roles.image_ratio / roles.image_ranks"
        )
    names = set(fs.ls(folder, detail=False))
    tars = sorted(p for p in names if p.endswith(".tar") and p[: -len(".tar")] + ".json" in names)
    if not tars:
        raise DataError(
            f"{root}/{role}s/ holds no complete shard (NNNNNN.tar with its NNNNNN.json); rerun prep"
        )
    return [fs.unstrip_protocol(p) for p in tars]


def read_dataset_json(root: str, storage: dict[str, Any] | None = None) -> dict[str, Any]:
    fs, base = fsspec.core.url_to_fs(root, **(storage or {}))
    path = f"{base.rstrip('/')}/dataset.json"
    try:
        doc = json.loads(fs.cat_file(path))
    except FileNotFoundError:
        raise DataError(
            f"{root} has no dataset.json: training reads the format version and frame size from it; "
            f"point --data at a pipeline.prep output root (docs/shard-format.md)"
        ) from None
    except ValueError as err:
        raise DataError(f"{root}/dataset.json is not valid JSON ({err}); rerun prep to rewrite it") from None
    if not isinstance(doc, dict):
        raise DataError(f"{root}/dataset.json must hold a JSON object")
    return doc


def _stem(url: str) -> str:
    return url.rsplit("/", 1)[-1].split(".", 1)[0]


def shard_sizes(root: str, role: str, urls: list[str], storage: dict[str, Any] | None = None) -> list[int]:
    """`ok` per shard from `OUT/index.parquet` when it lists them, else from each shard's json."""
    fs, base = fsspec.core.url_to_fs(root, **(storage or {}))
    base = base.rstrip("/")
    known: dict[str, int] = {}
    if fs.exists(f"{base}/index.parquet"):
        import pyarrow.parquet as pq

        with fs.open(f"{base}/index.parquet", "rb") as fh:
            rows = pq.read_table(fh, columns=["kind", "shard", "ok"]).to_pylist()
        for row in rows:
            if str(row["kind"]) in (role, f"{role}s") and row["ok"] is not None:
                shard = str(row["shard"])
                known[f"{int(shard):06d}" if shard.isdigit() else _stem(shard)] = int(row["ok"])
    missing = [u for u in urls if _stem(u) not in known]
    if missing:
        paths = [f"{base}/{role}s/{_stem(u)}.json" for u in missing]
        for path, blob in fs.cat(paths, on_error="return").items():
            try:
                ok = json.loads(blob)["ok"]
                known[_stem(path)] = int(ok)
            except (TypeError, ValueError, KeyError):
                pass
    unknown = [u for u in urls if _stem(u) not in known]
    if unknown:
        log.warning(
            "%d %s shards have no ok count (e.g. %s): drawn with size 1", len(unknown), role, unknown[0]
        )
    return [max(0, known.get(_stem(u), 1)) for u in urls]


class ShardReader:
    """The samples of one shard from sample `offset` on. A storage error (S3 503/500, reset)
    reopens the shard at the current sample after a backoff with jitter, up to `retries` times;
    a ShardError (compressed, corrupt) is final."""

    def __init__(self, url: str, offset: int, opts: ReadOptions, events: Counter | None = None):
        self.url, self.offset, self.opts = url, offset, opts
        self.events = Counter() if events is None else events  # read_retries, unknown_member, ...
        self._file = self._it = None

    def _open(self) -> None:
        self._file = fsspec.open(self.url, "rb", **self.opts.storage).open()
        self._it = iter_samples(
            self._file, max_member_bytes=self.opts.max_member_bytes, skip=self.offset, skipped=self.events
        )

    def next(self) -> RawSample | None:
        """The next sample, or None at the end of the shard."""
        for attempt in range(self.opts.retries + 1):
            try:
                if self._it is None:
                    self._open()
                raw = next(self._it, None)
                if raw is not None:
                    self.offset = raw.index + 1
                return raw
            except ShardError:
                self.close()
                raise
            except Exception as err:  # noqa: BLE001 - storage clients raise many types
                self.close()
                if attempt == self.opts.retries:
                    raise
                self.events["read_retries"] += 1
                wait = self.opts.backoff_s * 2**attempt * (0.5 + _JITTER.random())  # jitter: timing only
                log.info("read of %s failed (%s); retry %d in %.2fs", self.url, err, attempt + 1, wait)
                time.sleep(wait)
        return None

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except Exception:  # noqa: BLE001 - closing a broken connection may fail too
                pass
        self._file = self._it = None


def load_source(
    root: str,
    role: str,
    storage: dict[str, Any] | None = None,
    text_dim: int | None = None,
    dataset: dict[str, Any] | None = None,
) -> ShardSource:
    """Shards, sample counts and the sample spec of one role under a data root."""
    dataset = read_dataset_json(root, storage) if dataset is None else dataset
    try:
        spec = SampleSpec.from_dataset(dataset, role, text_dim)
    except DatasetError as err:
        raise DataError(f"{root}/dataset.json: {err}") from None
    urls = list_shards(root, role, storage)
    return ShardSource(urls, shard_sizes(root, role, urls, storage), spec)
