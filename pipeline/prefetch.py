"""Remote media between the network and the decoder, in bounded memory (`http.prefetch_bytes`).

A shard task downloads up to `http.max_concurrency` files ahead of decoding, in manifest order
(`Prefetch`). Their bodies count against one `ByteBudget` per task: the bytes held in RAM by
downloads in progress plus those fetched and not yet decoded never exceed
`http.prefetch_bytes`. A body goes to a temporary file instead of RAM (`Spilled`, which the
decoder child opens by path) when
- its size (Content-Length, or the object's size) is over `http.spill_bytes`, or it grows past
  that while streaming: large videos never sit in RAM whole, or
- the budget has no room left for its next chunk: downloads never wait on each other, so the
  file the decoder needs next can always finish (no deadlock behind files fetched ahead).
No new download starts while the budget is full. The files live in one folder per task under
`http.spill_dir` (the system temp folder by default), removed when the task has passed them and
again when it ends; a task killed before that leaves its folder to the next task on the host,
which removes the folders of dead processes (`_sweep_dead`).

Outside the budget: one read buffer (1 MiB) per download thread, a growing body's spare
capacity (a bytearray over-allocates up to about 1/8), and a file's bytes while the decoder
works on them (the consumer releases a file by asking for the next one). `bench/fetch_memory.py`
measures both counts.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, Any

from core.shards import SampleError


@dataclass(frozen=True)
class Spilled:
    """A download kept on local disk: the decoder opens `path` (the source URI stays the name)."""

    path: str
    size: int


class ByteBudget:
    """Bytes held in RAM by one task's downloads; `peak` is the most ever held at once."""

    def __init__(self, limit: int):
        self.limit = limit
        self.held = 0
        self.peak = 0
        self._lock = threading.Lock()

    def take(self, n: int) -> bool:
        """Count `n` more bytes if they fit; False (nothing counted) if they do not."""
        with self._lock:
            if self.held + n > self.limit:
                return False
            self.held += n
            self.peak = max(self.peak, self.held)
            return True

    def give(self, n: int) -> None:
        with self._lock:
            self.held -= n

    def full(self) -> bool:
        with self._lock:
            return self.held >= self.limit


class Body:
    """One download's bytes: in RAM within the budget and `spill_bytes`, else in a temp file.

    `Fetcher` calls `start(length)` at the headers, `write(chunk)` per chunk, `reset()` before
    a retry; `result()` is bytes or a `Spilled`; `discard()` releases both."""

    def __init__(self, budget: ByteBudget | None = None, spill_bytes: int | None = None,
                 spill_dir: Any = None):
        self.budget, self.spill_bytes, self.spill_dir = budget, spill_bytes, spill_dir
        # In RAM: the first chunk as read, then one growing bytearray (a join of many chunks
        # would hold the body twice at the end).
        self.ram: bytes | bytearray = b""
        self.held = 0  # bytes of `ram` counted against the budget
        self.size = 0
        self.path: str | None = None
        self._file: IO[bytes] | None = None

    def start(self, length: int | None) -> None:
        if length is not None and self.spill_bytes is not None and length > self.spill_bytes:
            self._spill()

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self._file is None and self.spill_bytes is not None and self.size > self.spill_bytes:
            self._spill()
        if self._file is None:
            if self.budget is None or self.budget.take(len(chunk)):
                self.held += len(chunk) if self.budget is not None else 0
                self._keep(chunk)
                return
            self._spill()  # no room: to disk rather than wait on the files fetched ahead
        if self._file is None:  # nowhere to spill (a plain Body): RAM, uncounted
            self._keep(chunk)
            return
        self._file.write(chunk)

    def _spill(self) -> None:
        if self._file is not None or self.spill_dir is None:
            return
        fd, self.path = tempfile.mkstemp(dir=self.spill_dir(), suffix=".part")
        self._file = os.fdopen(fd, "wb")
        self._file.write(self.ram)
        self._release_ram()

    def _release_ram(self) -> None:
        self.ram = b""
        if self.budget is not None and self.held:
            self.budget.give(self.held)
        self.held = 0

    def reset(self) -> None:
        self.discard()
        self.size = 0

    def _keep(self, chunk: bytes) -> None:
        if not self.ram:
            self.ram = chunk
        else:
            if isinstance(self.ram, bytes):
                self.ram = bytearray(self.ram)
            self.ram += chunk

    def result(self) -> bytes | bytearray | Spilled:
        """The body: bytes-like in RAM (a bytearray when it came in several chunks), or a `Spilled`."""
        if self._file is None:
            return self.ram
        self._file.close()
        return Spilled(str(self.path), self.size)

    def discard(self) -> None:
        self._release_ram()
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.path is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self.path = None


_PREFIX = "higen-fetch-"


def _host() -> str:
    return socket.gethostname().replace("-", "_") or "host"


def _sweep_dead(root: str) -> None:
    """Remove the temp folders of this host's tasks that died without cleaning up (SIGKILL,
    OOM): named `higen-fetch-HOST-PID-*`, for a PID that no longer runs. Other hosts sharing
    the folder (a network disk) and live processes are left alone."""
    mine = f"{_PREFIX}{_host()}-"
    try:
        names = os.listdir(root)
    except OSError:
        return
    for name in names:
        pid = name[len(mine):].split("-", 1)[0] if name.startswith(mine) else ""
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class Prefetch:
    """`run(sources)` yields (bytes | Spilled | None, SampleError | None) in input order; a
    result's memory and temp file are released when the next one is asked for."""

    def __init__(self, fetcher: Any, prefetch_bytes: int, spill_bytes: int, spill_root: str = ""):
        self.fetcher = fetcher
        self.budget = ByteBudget(prefetch_bytes)
        self.spill_bytes = spill_bytes
        self.spill_root = spill_root or tempfile.gettempdir()
        self.folder: str | None = None
        self.spilled = 0  # downloads that went to disk
        self._lock = threading.Lock()

    def _folder(self) -> str:
        with self._lock:
            if self.folder is None:
                os.makedirs(self.spill_root, exist_ok=True)
                _sweep_dead(self.spill_root)
                prefix = f"{_PREFIX}{_host()}-{os.getpid()}-"
                self.folder = tempfile.mkdtemp(prefix=prefix, dir=self.spill_root)
            return self.folder

    def _fetch(self, source: Any) -> tuple[Body, tuple[Any, Any]]:
        body = Body(self.budget, self.spill_bytes, self._folder)
        try:
            result = self.fetcher.fetch(source, body)  # body.result(), or bytes it got another way
        except SampleError as exc:  # the row's failure
            body.discard()
            return body, (None, exc)
        except BaseException:
            body.discard()
            raise
        if isinstance(result, Spilled):
            with self._lock:
                self.spilled += 1
        return body, (result, None)

    def run(self, sources: Iterable[Any]) -> Iterator[tuple[Any, Any]]:
        window = self.fetcher.http.max_concurrency
        pending: deque[Future | None] = deque()
        pool = ThreadPoolExecutor(window, thread_name_prefix="fetch")
        try:
            it = iter(sources)
            for source in it:
                if self.fetcher.needs_fetch(source):
                    pending.append(pool.submit(self._fetch, source))
                else:
                    pending.append(None)
                # Yield the head when the window or the budget is full, or it needs no fetch.
                while pending and (len(pending) > window or self.budget.full() or pending[0] is None):
                    yield from self._yield(pending.popleft())
            while pending:
                yield from self._yield(pending.popleft())
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            for future in pending:
                if future is not None and future.done() and not future.cancelled() and not future.exception():
                    future.result()[0].discard()
            if self.folder is not None:
                shutil.rmtree(self.folder, ignore_errors=True)

    @staticmethod
    def _yield(head: Future | None) -> Iterator[tuple[Any, Any]]:
        body, result = head.result() if head is not None else (None, (None, None))
        try:
            yield result
        finally:  # the consumer asked for the next one (or stopped): it is done with this file
            if body is not None:
                body.discard()
