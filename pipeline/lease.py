"""One job per output root: `OUT/_lease.json` names the run that holds it.

Two prep jobs on one output would delete each other's temporary files and race on commits.
The first job creates the lease with an exclusive create (`O_EXCL` locally, a conditional PUT
`If-None-Match: *` on S3); a second job refuses with a message naming the holder, unless the
holder's heartbeat is older than `execution.lease_timeout_s`, or it ran on this host and its
process is gone (it died without releasing).

Guarantee: exclusive on local and network filesystems with `O_EXCL`, and on object stores that
honour conditional PUTs (AWS S3 since 2024, MinIO, GCS through its own API). A store that
ignores `If-None-Match` gives last-writer-wins; the re-read after writing then catches all but
near-simultaneous starts, which the docs state.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Any

from pipeline.storage import OutputStore, json_bytes

LEASE_FILE = "_lease.json"


class LeaseError(RuntimeError):
    """Another job holds the output; the message names it and what to do."""


def new_run_id() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"


class Lease:
    """`acquire()` at start, a heartbeat thread while running, `release()` at the end."""

    def __init__(self, store: OutputStore, timeout_s: float, run_id: str | None = None):
        self.store, self.timeout_s = store, float(timeout_s)
        self.run_id = run_id or new_run_id()
        self.path = store.path(LEASE_FILE)
        self.started_at = time.time()
        self.lost: str | None = None  # why the lease was lost (another run took it over)
        self.taken_over: dict[str, Any] | None = None  # the stale lease this run replaced
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _doc(self) -> dict[str, Any]:
        return dict(run_id=self.run_id, host=socket.gethostname(), pid=os.getpid(),
                    started_at=self.started_at, heartbeat=time.time(), timeout_s=self.timeout_s)

    def _read(self) -> dict[str, Any] | None:
        self.store.fs.invalidate_cache(self.path)
        try:
            return json.loads(self.store.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        except ValueError:  # a torn or foreign file: treat as stale rather than lock forever
            return {"run_id": "?", "heartbeat": 0}

    def _create(self) -> bool:
        try:
            self.store.fs.pipe_file(self.path, json_bytes(self._doc()), mode="create")
            return True
        except FileExistsError:
            return False
        except OSError as exc:  # botocore's PreconditionFailed comes through as OSError
            if "PreconditionFailed" in str(exc) or "412" in str(exc):
                return False
            raise

    def _dead_here(self, holder: dict[str, Any]) -> bool:
        """The holder ran on this host and its process is gone: stale now, not after the timeout
        (a SIGKILLed driver rerun on the same head node must not wait)."""
        import psutil

        here = holder.get("host") == socket.gethostname()
        return here and not psutil.pid_exists(int(holder.get("pid") or 0))

    def acquire(self) -> Lease:
        if self.store.is_local:
            os.makedirs(self.store.root, exist_ok=True)
        for _ in range(2):  # second try after removing a stale lease
            if self._create():
                break
            holder = self._read()
            if holder is None:
                continue  # released between our create and read
            age = time.time() - float(holder.get("heartbeat", 0))
            if age < self.timeout_s and not self._dead_here(holder):
                raise LeaseError(
                    f"{self.store.url} is in use by run {holder.get('run_id')} on host "
                    f"{holder.get('host')} (pid {holder.get('pid')}, last heartbeat {age:.0f} s ago). "
                    "Wait for it to finish, write to another --out, or, if that job is dead, wait "
                    f"{self.timeout_s - age:.0f} s more (execution.lease_timeout_s) or delete "
                    f"{self.path}"
                )
            self.taken_over = holder
            self.store.fs.rm_file(self.path)
        else:
            raise LeaseError(f"{self.store.url}: another job keeps taking the lease {self.path}; "
                             "make sure only one prep job writes to this output")
        now = self._read()
        if not now or now.get("run_id") != self.run_id:  # a store without conditional PUTs
            raise LeaseError(f"{self.store.url}: run {now and now.get('run_id')} took the lease at the "
                             "same moment; only one prep job may write to an output")
        self._thread = threading.Thread(target=self._beat, name="prep-lease", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        every = max(self.timeout_s / 4, 0.2)
        while not self._stop.wait(every):
            holder = self._read()
            if not holder or holder.get("run_id") != self.run_id:
                self.lost = f"run {holder and holder.get('run_id')} replaced this run's lease {self.path}"
                return
            self.store.fs.pipe_file(self.path, json_bytes(self._doc()))

    def check(self) -> None:
        """Raise if another run took the lease (this run stalled past the timeout)."""
        if self.lost:
            raise LeaseError(f"{self.store.url}: {self.lost}; stopping so two jobs never write at once")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        holder = self._read()
        if holder and holder.get("run_id") == self.run_id:
            self.store.fs.rm_file(self.path)
