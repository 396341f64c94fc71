"""Completions of many Ray tasks in the order they finish, at O(1) per completion.

`ray.wait(list(pending), num_returns=1)` per completion rebuilds and scans the whole pending
list each time: O(tasks) per completion, O(tasks^2) per job when thousands of shard tasks are
in flight on a large cluster (bench/driver_scale.py measures it). Instead every submitted ref
gets a completion callback (`ObjectRef.future()`), which puts it on a queue; the driver takes
finished tasks off that queue. Nothing is polled and nothing scans the pending set.
"""

from __future__ import annotations

import queue
from collections.abc import Hashable
from concurrent.futures import Future
from typing import Any


class Completions:
    """Pending Ray tasks, each with a tag; `next()` returns (tag, result or exception) for one
    finished task, each task exactly once, in completion order."""

    def __init__(self, poll_s: float = 1.0):
        self._done: queue.SimpleQueue[tuple[Hashable, Future]] = queue.SimpleQueue()
        self._pending = 0
        self._poll_s = poll_s  # queue waits are cut into slices so Ctrl-C is seen promptly

    def __len__(self) -> int:
        return self._pending

    def add(self, ref: Any, tag: Hashable) -> None:
        """Track `ref` (a Ray ObjectRef); `tag` comes back with its result."""
        future = ref.future()
        self._pending += 1
        future.add_done_callback(lambda f: self._done.put((tag, f)))

    def next(self) -> tuple[Hashable, Any, BaseException | None]:
        """Block until a task finishes: (tag, its result, None) or (tag, None, the exception
        `ray.get` would raise)."""
        if self._pending == 0:
            raise IndexError("no pending tasks")
        while True:
            try:
                tag, future = self._done.get(timeout=self._poll_s)
                break
            except queue.Empty:
                continue
        self._pending -= 1
        error = future.exception()
        return tag, (None if error is not None else future.result()), error
