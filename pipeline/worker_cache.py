"""Objects a Ray worker process keeps between shard tasks (models, decoder children).

Loading the VAE or starting a decoder child per shard would dominate small shards; Ray reuses
worker processes, so each slot holds one object per process, keyed by the config that built it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any


class WorkerCache:
    """One object per slot; a different config replaces (and closes) the old one."""

    def __init__(self) -> None:
        self._slots: dict[str, tuple[str, Any]] = {}

    def get(self, slot: str, config: Any, build: Callable[[], Any]) -> Any:
        key = json.dumps(config, sort_keys=True, default=str)
        held = self._slots.get(slot)
        if held is not None and held[0] == key:
            return held[1]
        if held is not None and hasattr(held[1], "close"):
            held[1].close()
        obj = build()
        self._slots[slot] = (key, obj)
        return obj


WORKER_CACHE = WorkerCache()  # the one per worker process
