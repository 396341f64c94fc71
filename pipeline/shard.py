"""One shard, start to commit: the body of a Ray task (`ShardTask.run`).

Rows flow in manifest order: fetch (remote media, prefetched by a thread pool) -> decode
(CPU, this worker's `Decoder`, its video child process) -> encode, in batches, either here
(`LocalEncode`) or by the encoder actors (`ActorEncode`) while this task decodes the next
batch -> the tar writer, which takes rows strictly in order from a small reorder buffer
(`RowFlow`, the one object holding a run's state).

Every encode call gets exactly `batch_samples` samples (a short batch is padded, see
`encode_clients.encode_results`): identical inputs give byte-identical tars even when a
neighbour failed.

Duplicates are found before any work: the first row with a given source keeps the key, later
ones fail with reason `duplicate`; the driver marks repeats of a source first seen in an
earlier shard (`ShardPlan.duplicate_of`), so a key appears once per dataset. Any exception from one
sample becomes that row's failure; only what is no row's fault fails the task, as
`TransientTaskError` (a storage error, an encoder actor that died; pipeline/retry.py), which
Ray retries whole.

Untrusted rows (docs/untrusted.md): each source passes `SourcePolicy.check` (protocol, and a
local path's realpath inside the manifest's roots) before any byte is read; a local file is
checked again just before decoding, in case it became a symlink meanwhile. Failure details are
redacted once more on the way into the status table.
"""

from __future__ import annotations

import time
import traceback
from collections import deque
from typing import Any

from core.shard_format import SampleError, sample_key
from pipeline.config import PrepConfig
from pipeline.encode_clients import ActorEncode, LocalEncode, Result
from pipeline.fetch import Fetcher, is_remote
from pipeline.manifest import ShardPlan
from pipeline.prefetch import Spilled
from pipeline.retry import TransientTaskError, kept_failure, redone, retry_mode
from pipeline.status_fields import failed_fields, ok_fields
from pipeline.storage import OutputStore
from pipeline.untrusted import SourcePolicy, redact_text
from pipeline.worker_cache import WORKER_CACHE
from pipeline.worker_env import keep_heap_pages
from pipeline.writer import ShardWriter, iter_tar_samples, read_status


class RowFlow:
    """A run's rows between decode and the writer: the open batch, the batches in flight at
    the encoder, and the reorder buffer of settled rows the writer takes in order."""

    def __init__(self, plan: ShardPlan, keys: list[str], settled: dict[int, Result],
                 encode: Any, writer: ShardWriter, old_samples: Any, batch_samples: int,
                 redact_params: tuple[str, ...] = ()):
        self.plan, self.keys, self.redact_params = plan, keys, redact_params
        self.encode, self.writer, self.old_samples = encode, writer, old_samples
        self.batch_samples = batch_samples
        self.resolved: dict[int, Result] = dict(settled)
        self.next_pos = 0
        self.batch: list[tuple[int, Any]] = []
        self.in_flight: deque = deque()
        self.timing = dict(fetch_s=0.0, decode_s=0.0, encode_s=0.0, write_s=0.0)

    def settle(self, pos: int, res: Result) -> None:
        self.resolved[pos] = res

    def add(self, pos: int, decoded: Any, batches_in_flight: int) -> None:
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
                self.resolved[pos] = res
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
        plan, writer, key = self.plan, self.writer, self.keys[pos]
        source = plan.sources[pos] or ""
        caption = plan.captions[pos]
        caption = None if caption is None else str(caption)
        fields = dict(shard=plan.index, row=plan.first_row + pos)
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


class ShardTask:
    """`run(plan)` processes one shard and commits it; returns its stats."""

    def __init__(
        self,
        cfg: PrepConfig,
        out: str,
        fingerprint: str,
        actors: list | None = None,
        actor_model_ids: dict[str, Any] | None = None,
        actor_nodes: list[str] | None = None,
        local_paths: dict[str, str] | None = None,
        run_id: str = "run",
    ):
        self.cfg = cfg
        self.store = OutputStore(out, cfg.storage.options, run_id=run_id)
        self.fingerprint = fingerprint
        self.actors = actors or []
        self.actor_model_ids = actor_model_ids or {}
        self.actor_nodes = actor_nodes or []  # Ray node id of each actor
        self.local_paths = local_paths or {}  # hub models the driver fetched (placement.py)

    def _decoder(self):
        from preprocessing.process import Decoder

        threads = max(1, int(self.cfg.execution.cpus_per_worker))
        key = (self.cfg.video, self.cfg.image, threads)
        return WORKER_CACHE.get(
            "decoder", key, lambda: Decoder(self.cfg.video, self.cfg.image, decode_threads=threads)
        )

    def _batch_samples(self, kind: str) -> int:
        # Samples per encode call: as many clips (or images) as fit the frame budget
        # models.batch_frames (models.batch_size when 0), at least one.
        frames = self.cfg.video.frames if kind == "video" else 1
        return max(1, self.cfg.models.frames_per_call() // frames)

    def _encode_client(self, task_offset: int):
        if self.actors:
            import ray

            node = ray.get_runtime_context().get_node_id()
            return ActorEncode(self.actors, task_offset, self.actor_model_ids, self.actor_nodes, node)
        return LocalEncode(self.cfg, self.local_paths)

    def _policy(self, plan: ShardPlan) -> SourcePolicy:
        return SourcePolicy(tuple(self.cfg.manifest.allowed_protocols), plan.roots)

    @staticmethod
    def _allowed(policy: SourcePolicy, source: str) -> Result | None:
        """None if `source` may be read, else its `forbidden_path` failure."""
        try:
            policy.check(source)
        except SampleError as exc:
            return ("failed", exc.reason, exc.detail)
        return None

    def _triage(self, plan: ShardPlan, kept_keys: set[str], kept_failed: dict[int, Result] | None = None
                ) -> tuple[list[str], dict[int, Result]]:
        """Keys of every row, and the rows settled before any work (empty, forbidden, duplicate,
        kept: ok, or a failure this --retry-failed mode does not redo)."""
        kept_failed = kept_failed or {}
        keys, settled, first_row = [], {}, {}
        policy = self._policy(plan)
        for pos, source in enumerate(plan.sources):
            key = sample_key(source) if source else ""
            keys.append(key)
            row = plan.first_row + pos
            if not source:
                column = "video" if plan.kind == "videos" else "image"
                settled[pos] = ("failed", "missing_file", f"manifest row {row}: the {column} column is empty")
            elif (refused := self._allowed(policy, source)) is not None:
                settled[pos] = refused
            elif key in first_row or pos in plan.duplicate_of:
                settled[pos] = (
                    "failed",
                    "duplicate",
                    f"{source}: same source as manifest row {plan.duplicate_of.get(pos, first_row.get(key))}",
                )
            else:
                first_row[key] = row
                if key in kept_keys:
                    settled[pos] = ("kept", key)
                elif pos in kept_failed:
                    settled[pos] = kept_failed[pos]
        return keys, settled

    def _kept(self, plan: ShardPlan, mode: str | None = "all") -> tuple[set[str], dict[int, Result]]:
        """`--retry-failed`: keys of the committed shard's ok rows (checked against the plan), and
        its failures that `mode` does not redo, by position (pipeline/retry.py)."""
        rows = read_status(self.store, plan.kind, plan.index)
        if len(rows) != len(plan.sources) or any(
            r["source"] != s for r, s in zip(rows, plan.sources) if s is not None
        ):
            raise RuntimeError(
                f"{plan.kind}/{plan.index:06d}: the committed shard does not match the manifest rows; "
                "the manifest changed since it was written: rerun with --overwrite"
            )
        failed = {pos: kept_failure(r) for pos, r in enumerate(rows)
                  if r["status"] != "ok" and not redone(r["reason"], mode)}
        return {r["key"] for r in rows if r["status"] == "ok"}, failed

    def run(self, plan: ShardPlan, retry: bool | str = False, task_offset: int = 0) -> dict[str, Any]:
        """`retry`: False, or the `--retry-failed` mode ("transient", "all"; True = "transient").
        Raises `TransientTaskError` when the shard fails outside its rows (Ray retries it)."""
        try:
            return self._run(plan, retry_mode(retry), task_offset)
        except OSError as exc:  # the output store (or its network) failed, not a row
            raise TransientTaskError(
                f"{plan.kind}/{plan.index:06d}: storage error: {type(exc).__name__}: {str(exc)[:300]}"
            ) from exc

    def _run(self, plan: ShardPlan, mode: str | None, task_offset: int) -> dict[str, Any]:
        start = time.perf_counter()
        keep_heap_pages()
        kind = "video" if plan.kind == "videos" else "image"
        retry = mode is not None
        kept_keys, kept_failed = self._kept(plan, mode) if retry else (set(), {})
        keys, settled = self._triage(plan, kept_keys, kept_failed)
        if retry:  # un-commit first: a crash while rewriting leaves a shard that is redone whole
            self.store.remove([self.store.shard_path(plan.kind, plan.index, "json")])
        old_samples = iter_tar_samples(self.store, plan.kind, plan.index) if retry else iter(())
        encode = self._encode_client(task_offset)
        decoder = self._decoder()
        fetcher = Fetcher(self.cfg.http, self.cfg.storage.options, self.cfg.manifest.redact_query_params)
        policy = self._policy(plan)
        writer = ShardWriter(self.store, plan.kind, plan.index)
        flow = RowFlow(plan, keys, settled, encode, writer, old_samples, self._batch_samples(kind),
                       tuple(self.cfg.manifest.redact_query_params))
        timing = flow.timing
        try:
            sources = [
                None if pos in settled else plan.fetch_urls.get(pos, s) for pos, s in enumerate(plan.sources)
            ]
            fetched = fetcher.prefetch(sources)
            for pos, source in enumerate(plan.sources):
                t = time.perf_counter()
                data, error = next(fetched)
                timing["fetch_s"] += time.perf_counter() - t
                if pos in settled:
                    flow.flush()
                    continue
                if error is not None:
                    flow.settle(pos, ("failed", error.reason, error.detail))
                elif not is_remote(source) and (refused := self._allowed(policy, source)) is not None:
                    flow.settle(pos, refused)
                else:
                    t = time.perf_counter()
                    decoded = self._decode(decoder, kind, source, plan.captions[pos], data)
                    timing["decode_s"] += time.perf_counter() - t
                    if isinstance(decoded, tuple):
                        flow.settle(pos, decoded)
                    else:
                        flow.add(pos, decoded, self.cfg.execution.batches_in_flight)
                flow.flush()
            flow.drain()
            if hasattr(old_samples, "close"):
                old_samples.close()
            return writer.commit(
                dict(
                    first_row=plan.first_row,
                    fingerprint=self.fingerprint,
                    model_ids=encode.model_ids,
                    seconds=time.perf_counter() - start,
                    timing=timing,
                    retried=retry,
                    fetch=_fetch_stats(fetcher),
                )
            )
        except BaseException:
            writer.abort()
            raise

    @staticmethod
    def _decode(decoder: Any, kind: str, source: str, caption: Any, data: bytes | bytearray | Spilled | None):
        try:
            if isinstance(data, Spilled):  # a large download: the decoder opens its temp file
                return decoder.decode(kind, source, caption, path=data.path)
            return decoder.decode(kind, source, caption, data=data)
        except SampleError as exc:
            return ("failed", exc.reason, exc.detail, exc.meta)
        except Exception as exc:  # a bug on one odd file must not kill the shard
            last = traceback.format_exc().strip().splitlines()[-1]
            return ("failed", "internal_error", f"{source}: {type(exc).__name__}: {last[:300]}")


def _fetch_stats(fetcher: Fetcher) -> dict[str, int]:
    """The shard's downloads against `http.prefetch_bytes` (pipeline/prefetch.py)."""
    prefetch = fetcher.prefetcher
    if prefetch is None:
        return {}
    return dict(peak_bytes=prefetch.budget.peak, spilled=prefetch.spilled)
