"""One shard, start to commit: the body of a Ray task (`ShardTask.run`).

Rows flow in manifest order: fetch (remote media, prefetched by a thread pool) -> decode
(CPU, this worker's `Decoder`, its video child process) -> encode, in batches, either here
(`LocalEncode`) or by the encoder actors (`ActorEncode`) while this task decodes the next
batch -> the tar writer, which takes rows strictly in order from a small reorder buffer
(`RowFlow`, pipeline/row_flow.py, the one object holding a run's state).

Every encode call gets exactly `batch_samples` samples (a short batch is padded, see
`encode_clients.encode_results`): identical inputs give byte-identical tars even when a
neighbour failed.

Duplicates are found before any work: the first row with a given source keeps the key, later
ones fail with reason `duplicate`; the dedupe pass (pipeline/dedupe.py) marks repeats of a source
first seen in an earlier shard (`ShardPlan.duplicate_of`), so a key appears once per dataset.
Any exception from one sample becomes that row's failure; only what is no row's fault fails
the task, as `TransientTaskError` (a storage error, an encoder actor that died;
pipeline/retry.py), which Ray retries whole.

Untrusted rows (docs/untrusted.md): each source passes `SourcePolicy.check` (protocol, and a
local path's realpath inside the manifest's roots) before any byte is read; a local file is
checked again just before decoding, in case it became a symlink meanwhile. Failure details are
redacted once more on the way into the status table.
"""

from __future__ import annotations

import time
import traceback
from typing import Any

from core.shard_format import SampleError, sample_key
from pipeline.clip_rows import RowClips, decode_groups
from pipeline.clips import RowError
from pipeline.config import PrepConfig
from pipeline.encode_clients import ActorEncode, LocalEncode, Result
from pipeline.fetch import Fetcher, is_remote
from pipeline.filters import ShardFilters
from pipeline.plan import ShardPlan
from pipeline.prefetch import Spilled
from pipeline.retry import TransientTaskError, kept_failure, redone, retry_mode
from pipeline.row_flow import RowFlow
from pipeline.splitting import make_splitter, split_rows
from pipeline.storage import OutputStore
from pipeline.untrusted import SourcePolicy
from pipeline.wds_input import TarRows
from pipeline.worker_cache import WORKER_CACHE
from pipeline.worker_env import keep_heap_pages
from pipeline.writer import ShardWriter, iter_tar_samples, read_status


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
        limits = self.cfg.filter.source_request()
        key = (self.cfg.video, self.cfg.image, threads, str(limits))
        return WORKER_CACHE.get(
            "decoder", key,
            lambda: Decoder(self.cfg.video, self.cfg.image, decode_threads=threads, source_filter=limits),
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

    def _triage(
        self, plan: ShardPlan, kept_keys: set[str], kept_failed: dict[str, Result] | None = None
    ) -> tuple[list[str], dict[int, Result], dict[int, RowClips]]:
        """Keys of every row, the rows settled before any work (empty, forbidden, duplicate,
        kept: ok, or a failure this --retry-failed mode does not redo; spans that do not parse),
        and the clips of rows with spans."""
        kept_failed = kept_failed or {}
        keys, settled, first_row, clips = [], {}, {}, {}
        policy = self._policy(plan)
        tar_rows = TarRows(plan)
        for pos, source in enumerate(plan.sources):
            key = sample_key(source) if source else ""
            keys.append(key)
            row = plan.first_row + pos
            if (unusable := tar_rows.failure(pos)) is not None:  # a tar sample with no media...
                settled[pos] = unusable
                continue
            if not source:
                column = "video" if plan.kind == "videos" else "image"
                settled[pos] = ("failed", "missing_file", f"manifest row {row}: the {column} column is empty")
                continue
            failure = self._allowed(policy, source)
            ident = plan.identity(pos)  # source (and spans): what the dedupe pass compares
            if failure is None and (ident in first_row or pos in plan.duplicate_of):
                what = "same source and spans" if plan.clips.has_spans else "same source"
                earlier = plan.duplicate_of.get(pos, first_row.get(ident))
                failure = ("failed", "duplicate", f"{source}: {what} as manifest row {earlier}")
            elif failure is None:
                first_row[ident] = row
            if plan.clips.has_spans:
                self._expand(plan, pos, source, (kept_keys, kept_failed), settled, clips, failure)
            elif failure is not None:
                settled[pos] = failure
            elif key in kept_keys:
                settled[pos] = ("kept", key)
            elif key in kept_failed:
                settled[pos] = kept_failed[key]
        return keys, settled, clips

    @staticmethod
    def _expand(plan: ShardPlan, pos: int, source: str, kept: tuple[set[str], dict[str, Result]],
                settled: dict[int, Result], clips: dict[int, RowClips], failure: Result | None) -> None:
        """Row `pos` as clips (pipeline/clips.py), or its whole-row failure. A row failing as a
        whole (`failure`: forbidden, duplicate) still gets one status row per clip when its
        spans parse, so the status table counts clips. `kept`: --retry-failed's ok keys and
        the failures it does not redo, by key."""
        try:
            spans = plan.clips.clips(plan.columns, pos, plan.first_row + pos, plan.captions[pos])
            row_clips = RowClips(source, spans, *(kept if failure is None else (set(), {})))
        except RowError as exc:
            settled[pos] = failure or ("failed", exc.reason, f"{source}: {exc.detail}")
            return
        for j in row_clips.pending() if failure is not None else ():
            row_clips.settle(j, failure)
        clips[pos] = row_clips
        if row_clips.done():
            settled[pos] = ("clips",)

    def _kept(self, plan: ShardPlan, mode: str | None = "all") -> tuple[set[str], dict[str, Result]]:
        """`--retry-failed`: keys of the committed shard's ok rows (checked against the plan), and
        its failures that `mode` does not redo, by key (pipeline/retry.py)."""
        rows = read_status(self.store, plan.kind, plan.index)
        if any(r.get("row") is None for r in rows):  # written before the `row` column existed
            changed = len(rows) != len(plan.sources) or any(
                r["source"] != s for r, s in zip(rows, plan.sources) if s is not None)
        else:  # one status row per clip: compare each manifest row's source
            by_row = {r["row"] - plan.first_row: r["source"] for r in rows}
            changed = sorted(by_row) != list(range(len(plan.sources))) or any(
                by_row[pos] != s for pos, s in enumerate(plan.sources) if s is not None)
        if changed:
            raise RuntimeError(
                f"{plan.kind}/{plan.index:06d}: the committed shard does not match the manifest rows; "
                "the manifest changed since it was written: rerun with --overwrite"
            )
        # By key: with clip spans a row has several status rows (rows without a key are settled
        # again by `_triage` itself).
        failed = {r["key"]: kept_failure(r) for r in rows
                  if r["status"] != "ok" and r["key"] and not redone(r["reason"], mode)}
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
        plan.materialize()  # the driver sent a description: read this shard's rows (pipeline/plan.py)
        kind = "video" if plan.kind == "videos" else "image"
        retry = mode is not None
        kept_keys, kept_failed = self._kept(plan, mode) if retry else (set(), {})
        splitter = make_splitter(self.cfg, self.store, plan, retry)  # video.split (pipeline/splitting.py)
        keys, settled, clips = self._triage(plan, kept_keys, kept_failed)
        filters = ShardFilters(self.cfg, plan.columns)
        for pos, res in filters.rejected(plan).items():  # manifest.filter: `filtered`, before any work
            settled[pos] = res
            clips.pop(pos, None)
        if retry:  # un-commit first: a crash while rewriting leaves a shard that is redone whole
            self.store.remove([self.store.shard_path(plan.kind, plan.index, "json")])
        old_samples = iter_tar_samples(self.store, plan.kind, plan.index) if retry else iter(())
        encode = self._encode_client(task_offset)
        decoder = self._decoder()
        fetcher = Fetcher(self.cfg.http, self.cfg.storage.options, self.cfg.manifest.redact_query_params)
        policy = self._policy(plan)
        extra_types = {n: plan.column_types.get(n) for n in self.cfg.manifest.extra_columns}
        writer = ShardWriter(self.store, plan.kind, plan.index, extra_types)
        flow = RowFlow(plan, keys, settled, encode, writer, old_samples, self._batch_samples(kind),
                       tuple(self.cfg.manifest.redact_query_params), clips)
        timing = flow.timing
        flow.filters = filters
        opens = getattr(decoder, "video_opens", 0)
        try:
            # One fetch and one open per video: rows naming the same source decode together.
            groups = decode_groups(plan.sources, settled)
            tar_rows = TarRows(plan)  # a `TAR_URL#KEY` source reads just its member (wds_input.py)
            fetched = fetcher.prefetch([
                tar_rows.target(rows[0], source, plan.fetch_urls.get(rows[0], source), policy)
                for source, rows in groups
            ])
            for source, rows in groups:
                t = time.perf_counter()
                data, error = next(fetched)
                timing["fetch_s"] += time.perf_counter() - t
                if error is not None:
                    refused = ("failed", error.reason, error.detail)
                elif not is_remote(source):
                    refused = self._allowed(policy, source)
                else:
                    refused = None
                if refused is not None:
                    for pos in rows:
                        flow.fail_row(pos, refused)
                    flow.flush()
                    continue
                rows = split_rows(splitter, flow, clips, plan, source, data, rows, (kept_keys, kept_failed))
                work = [((pos, j), clips[pos].clips[j].span, clips[pos].clips[j].caption)
                        if pos in clips else (pos, None, plan.captions[pos])
                        for pos in rows for j in (clips[pos].pending() if pos in clips else [None])]
                for n, (slot, span, caption) in enumerate(work):
                    t = time.perf_counter()
                    decoded = self._decode(decoder, kind, source, caption, data, span, n < len(work) - 1)
                    timing["decode_s"] += time.perf_counter() - t
                    if isinstance(decoded, tuple):
                        flow.settle(slot, decoded)
                    else:
                        filters.annotate(decoded, slot)  # KEY.json `extra`
                        tar_rows.annotate(slot if isinstance(slot, int) else slot[0], decoded)  # source_meta
                        flow.add(slot, decoded, self.cfg.execution.batches_in_flight)
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
                    video_opens=getattr(decoder, "video_opens", 0) - opens,  # one per video, not per clip
                    **plan.commit_fields(),  # (file, row range) pieces + sources digest: resume verifies
                    fetch=_fetch_stats(fetcher),
                )
            )
        except BaseException:
            writer.abort()
            raise

    @staticmethod
    def _decode(decoder: Any, kind: str, source: str, caption: Any, data: bytes | bytearray | Spilled | None,
                span: tuple[float, float] | None = None, keep_open: bool = False):
        try:
            clip = {} if span is None and not keep_open else dict(span=span, keep_open=keep_open)
            if isinstance(data, Spilled):  # a large download: the decoder opens its temp file
                return decoder.decode(kind, source, caption, path=data.path, **clip)
            return decoder.decode(kind, source, caption, data=data, **clip)
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
