"""The output root (`OUT`, a local path or any fsspec URL) and its commit protocol (docs/shard-format.md).

A shard's files are written under `OUT/_tmp/` and moved into `OUT/videos|images/` in the order
tar, parquet, json. On a local disk the move is a rename (atomic on one filesystem); on object
stores fsspec's `mv` is a server-side copy then a delete, so an object under a final name is
always complete. The `.json` is the commit marker: a shard without it is redone whole.

Resume costs one listing per kind folder (`ls`), never a probe per shard.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

KINDS = ("videos", "images")
TMP_DIR = "_tmp"
SHARD_FILE = re.compile(r"^(\d{6,})\.(tar|parquet|json)$")


class OutputError(RuntimeError):
    """The output root cannot be used; the message says which and what to do."""


def url_to_fs(url: str, options: dict[str, Any]) -> tuple[fsspec.AbstractFileSystem, str]:
    """fsspec filesystem + path for a URL; storage options apply only to remote protocols."""
    protocol = fsspec.core.split_protocol(url)[0]
    opts = options if protocol not in (None, "file", "local") else {}
    return fsspec.core.url_to_fs(url, **opts)


class OutputStore:
    """Paths, listing and atomic publishing under one output root."""

    def __init__(self, url: str, options: dict[str, Any] | None = None, run_id: str = "run"):
        self.url = url
        # Temporary names carry the run id, so cleaning up never touches another run's files.
        self.run_id = run_id
        self.fs, root = url_to_fs(url, options or {})
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.root = os.path.abspath(root) if self.is_local else root.rstrip("/")

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def shard_path(self, kind: str, index: int, ext: str) -> str:
        return self.path(kind, f"{index:06d}.{ext}")

    def tmp_path(self, name: str) -> str:
        # A random suffix: two attempts at one shard (a Ray retry) never share a temp file.
        return self.path(TMP_DIR, self.run_id, f"{name}.{uuid.uuid4().hex[:12]}")

    def makedirs(self) -> None:
        # Object stores have no folders; s3fs's makedirs would even create a missing bucket.
        if self.is_local:
            for folder in (f"{TMP_DIR}/{self.run_id}", *KINDS):
                os.makedirs(self.path(folder), exist_ok=True)

    def check_writable(self) -> None:
        """Write and delete a probe file, so a read-only output fails before any work."""
        probe = self.tmp_path("write-probe")
        try:
            self.makedirs()
            self.fs.pipe_file(probe, b"ok")
            self.fs.rm_file(probe)
        except (PermissionError, OSError) as exc:
            raise OutputError(
                f"output {self.url} is not writable ({type(exc).__name__}: {exc}); "
                "choose another --out or fix its permissions / credentials"
            ) from exc

    def list_shards(self, kind: str) -> dict[int, set[str]]:
        """{shard index: {extensions present}} from ONE listing of `OUT/kind`."""
        folder = self.path(kind)
        self.fs.invalidate_cache(folder)
        try:
            names = self.fs.ls(folder, detail=False)
        except FileNotFoundError:
            return {}
        found: dict[int, set[str]] = {}
        for name in names:
            match = SHARD_FILE.match(name.rstrip("/").rsplit("/", 1)[-1])
            if match:
                found.setdefault(int(match.group(1)), set()).add(match.group(2))
        return found

    def committed(self, kind: str) -> set[int]:
        return {i for i, exts in self.list_shards(kind).items() if "json" in exts}

    def publish(self, tmp: str, final: str) -> None:
        """Move a finished temp file to its final name (rename locally, copy+delete remotely)."""
        if self.is_local:
            os.replace(tmp, final)
        else:
            self.fs.mv(tmp, final)

    def write_atomic(self, final: str, data: bytes) -> None:
        tmp = self.tmp_path(final.rsplit("/", 1)[-1])
        self.fs.pipe_file(tmp, data)
        self.publish(tmp, final)

    def read_json(self, path: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.fs.cat_file(path))
        except FileNotFoundError:
            return None

    def read_jsons(self, paths: list[str]) -> dict[str, dict[str, Any]]:
        """Many small files in one call (object-store filesystems fetch them concurrently)."""
        if not paths:
            return {}
        blobs = self.fs.cat(paths, on_error="omit")
        return {p: json.loads(b) for p, b in blobs.items()}

    def remove(self, paths: list[str]) -> None:
        if paths:
            self.fs.rm(paths)

    def remove_shards(self, kind: str) -> None:
        """`--overwrite`: delete this kind's shard files (only files named like shards)."""
        self.remove(
            [self.shard_path(kind, i, ext) for i, exts in self.list_shards(kind).items() for ext in exts]
        )

    def clean_tmp(self, run_id: str | None = None) -> None:
        """Delete one run's temporary files (this run's by default)."""
        try:
            self.fs.rm(self.path(TMP_DIR, run_id or self.run_id), recursive=True)
        except FileNotFoundError:
            pass
        if self.is_local:
            try:
                os.rmdir(self.path(TMP_DIR))  # only when no other run has files there
            except OSError:
                pass


def json_bytes(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, indent=1, sort_keys=True) + "\n").encode("utf-8")
