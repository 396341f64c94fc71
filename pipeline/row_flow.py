"""`RowFlow`: one shard task's rows between decode and the tar writer (pipeline/shard.py).

It holds the open encode batch, the batches in flight at the encoder, and the reorder buffer
of settled rows (or clips: slots `(pos, j)`) that the writer takes strictly in manifest order,
so a shard's bytes never depend on which decode or encode finished first.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from pipeline.clip_rows import RowClips
from pipeline.encode_clients import Result
from pipeline.filters import ShardFilters
from pipeline.plan import ShardPlan
from pipeline.status_fields import failed_fields, ok_fields
from pipeline.untrusted import redact_text
from pipeline.writer import ShardWriter


class RowFlow:
    """A run's rows between decode and the writer: the open batch, the batches in flight at
    the encoder, and the reorder buffer of settled rows the writer takes in order."""

    def __init__(self, plan: ShardPlan, keys: list[str], settled: dict[int, Result],
                 encode: Any, writer: ShardWriter, old_samples: Any, batch_samples: int,
                 redact_params: tuple[str, ...] = (), clips: dict[int, RowClips] | None = None):
        self.plan, self.keys, self.redact_params = plan, keys, redact_params
        # Rows with clip spans: their slots are (position, clip index); the row is written
        # (settled as ("clips",)) once all of its clips have a result.
        self.clips = clips or {}
        self.encode, self.writer, self.old_samples = encode, writer, old_samples
        self.batch_samples = batch_samples
        self.resolved: dict[int, Result] = dict(settled)
        self.next_pos = 0
        self.batch: list[tuple[int, Any]] = []
        self.in_flight: deque = deque()
        self.timing = dict(fetch_s=0.0, decode_s=0.0, encode_s=0.0, write_s=0.0)
        self.filters: ShardFilters | None = None  # motion filters, extra columns (pipeline/filters.py)

    def settle(self, slot: int | tuple[int, int], res: Result) -> None:
        """The result of a row (slot = position) or of one clip of a row (position, clip)."""
        if isinstance(slot, tuple):
            if self.clips[slot[0]].settle(slot[1], res):
                self.resolved[slot[0]] = ("clips",)
        else:
            self.resolved[slot] = res

    def fail_row(self, pos: int, res: Result) -> None:
        """The whole row failed (fetch, policy): every clip still pending fails with it."""
        if pos in self.clips:
            for j in self.clips[pos].pending():
                self.settle((pos, j), res)
        else:
            self.settle(pos, res)

    def add(self, pos: int | tuple[int, int], decoded: Any, batches_in_flight: int) -> None:
        """Queue one decoded row; a full batch goes to the encoder."""
        self.batch.append((pos, decoded))
        if len(self.batch) >= self.batch_samples:
            self.send()
            self.collect(batches_in_flight)

    def send(self) -> None:
        t = time.perf_counter()
        items, self.batch = self.batch, []
        self.in_flight.append((items, self.encode.submit([d for _, d in items], self.batch_samples)))
        self.timing["encode_s"] += time.perf_counter() - t

    def collect(self, limit: int) -> None:
        """Wait for the oldest batches until at most `limit` are in flight."""
        while len(self.in_flight) > limit:
            t = time.perf_counter()
            items, handle = self.in_flight.popleft()
            for (pos, _), res in zip(items, self.encode.result(handle, [d for _, d in items])):
                self.settle(pos, res)
            self.timing["encode_s"] += time.perf_counter() - t

    def flush(self) -> None:
        """Write every settled row that is next in manifest order."""
        t = time.perf_counter()
        while self.next_pos in self.resolved:
            pos = self.next_pos
            self._write(pos, self.resolved.pop(pos))
            self.next_pos += 1
        self.timing["write_s"] += time.perf_counter() - t

    def _write(self, pos: int, res: Result) -> None:
        plan = self.plan
        source = plan.sources[pos] or ""
        fields = dict(shard=plan.index, row=plan.first_row + pos)
        if self.filters is not None:  # manifest.extra_columns: the row's, on each of its clips
            fields.update(self.filters.extra(pos))
        if res[0] == "clips":  # one sample and one status row per clip, in span order
            row = self.clips.pop(pos)
            for j, (clip, key) in enumerate(zip(row.clips, row.keys)):
                self._write_sample(key, source, clip.caption, row.results[j], dict(fields, **row.fields(j)))
        else:
            self._write_sample(self.keys[pos], source, plan.captions[pos], res, fields)

    def _write_sample(self, key: str, source: str, caption: Any, res: Result, fields: dict[str, Any]) -> None:
        plan, writer = self.plan, self.writer
        caption = None if caption is None else str(caption)
        if self.filters is not None:  # filter.min_motion / max_motion_jump on the encoded clip
            res = self.filters.check_result(res, source, fields)
        if res[0] == "kept":
            for old_key, members in self.old_samples:
                if old_key == key:
                    writer.add_ok(key, source, caption, members, **fields, **ok_fields(members))
                    return
            raise RuntimeError(
                f"{plan.kind}/{plan.index:06d}: sample {key} is in the status table but not the tar"
            )
        if res[0] == "ok":
            writer.add_ok(res[1], source, caption, res[2], **fields, **ok_fields(res[2]))
        else:
            writer.add_failed(key, source, caption, res[1], redact_text(res[2], self.redact_params),
                              **fields, **failed_fields(res))

    def drain(self) -> None:
        if self.batch:
            self.send()
        self.collect(0)
        self.flush()
