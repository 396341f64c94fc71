"""One shard, start to commit: the body of a Ray task (`ShardTask.run`).

Rows flow in manifest order: fetch (remote media, prefetched by a thread pool) -> decode
(CPU, this worker's `Decoder`, its video child process) -> encode, in batches, either here
(`LocalEncode`) or by the encoder actors (`ActorEncode`) while this task decodes the next
batch -> the tar writer, which takes rows strictly in order from a small reorder buffer.

Every encode call gets exactly `batch_samples` samples (a short batch is padded, see
`encode_results`): identical inputs give byte-identical tars even when a neighbour failed.

Duplicates are found before any work: the first row with a given source keeps the key, later
ones fail with reason `duplicate`; the driver marks repeats of a source first seen in an
earlier shard (`ShardPlan.duplicate_of`), so a key appears once per dataset. Any exception from one
sample becomes that row's failure; only storage errors (the shard cannot be written) fail
the task.
"""

from __future__ import annotations

import ctypes
import json
import platform
import sys
import time
import traceback
from collections import deque
from typing import Any

from core.shard_format import SampleError, sample_key
from pipeline.config import PrepConfig
from pipeline.fetch import Fetcher
from pipeline.manifest import ShardPlan
from pipeline.storage import OutputStore
from pipeline.writer import ShardWriter, iter_tar_samples, read_status

# Result of one row: ("ok", key, members) | ("failed", reason, detail)
Result = tuple

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
_WORKER: dict[str, tuple[str, Any]] = {}  # per worker process: models and decoders stay loaded


def _cached(slot: str, config: Any, build):
    """One object per worker process and config; a new config replaces (and closes) the old."""
    key = json.dumps(config, sort_keys=True, default=str)
    held = _WORKER.get(slot)
    if held is None or held[0] != key:
        if held is not None and hasattr(held[1], "close"):
            held[1].close()
        _WORKER[slot] = (key, build())
    return _WORKER[slot][1]


def keep_heap_pages() -> bool:
    """glibc: keep freed tensor buffers (up to 32 MB each, 256 MB at the heap top) for reuse.

    In Ray worker processes glibc's adaptive mmap threshold does not take effect: every VAE
    activation was a fresh mmap, and the page faults cost ~40% extra CPU per sample
    (measured: 0.55 s of system time per 48 tiny clips, 0.03 s after this). Pinning the
    thresholds gives the worker the same steady state as a plain process. No-op off glibc.
    """
    if _WORKER.get("malloc") is not None:
        return _WORKER["malloc"][1]
    ok = False
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        libc = ctypes.CDLL("libc.so.6")
        ok = bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(M_TRIM_THRESHOLD, 256 << 20))
    _WORKER["malloc"] = ("", ok)
    return ok


def set_torch_threads(cpus: float) -> int:
    import torch

    threads = max(1, int(round(cpus)))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def encode_results(encoder: Any, batch: list, size: int) -> list[Result]:
    """Encode `batch` padded to exactly `size` samples (copies of its last one, dropped after):
    kernels choose algorithms by batch size, so a sample's bytes must not depend on how many
    neighbours it had (a short last batch, rows failed or kept by --retry-failed)."""
    padded = batch + [batch[-1]] * (size - len(batch))
    out: list[Result] = []
    for rec in encoder.encode(padded)[: len(batch)]:
        if isinstance(rec, SampleError):
            out.append(("failed", rec.reason, rec.detail))
        else:
            out.append(("ok", rec.key, rec.members()))
    return out


class EncoderActor:
    """VAE + semantic model in one (GPU or CPU) process, shared by many shard tasks."""

    def __init__(self, cfg: PrepConfig):
        from preprocessing.process import Encoder

        keep_heap_pages()
        set_torch_threads(cfg.execution.cpus_per_encoder)
        self.encoder = Encoder(cfg.models)

    def encode(self, batch: list, size: int) -> list[Result]:
        return encode_results(self.encoder, batch, size)

    def model_ids(self) -> dict[str, Any]:
        return self.encoder.model_ids


class LocalEncode:
    """Encode inside the shard task (CPU-only clusters): no pixels cross processes."""

    def __init__(self, cfg: PrepConfig):
        from preprocessing.process import Encoder

        set_torch_threads(cfg.execution.cpus_per_worker)
        self.encoder = _cached("encoder", cfg.models, lambda: Encoder(cfg.models))
        self.model_ids = self.encoder.model_ids

    def submit(self, batch: list, size: int) -> list[Result]:
        return encode_results(self.encoder, batch, size)

    def result(self, handle: list[Result], batch: list) -> list[Result]:
        return handle


class ActorEncode:
    """Round-robin over the encoder actors; results are awaited in submission order."""

    def __init__(self, actors: list, offset: int, model_ids: dict[str, Any]):
        # model_ids come from the driver: asking an actor would queue behind its backlog.
        self.actors = actors
        self.turn = offset
        self.model_ids = model_ids

    def submit(self, batch: list, size: int):
        actor = self.actors[self.turn % len(self.actors)]
        self.turn += 1
        return actor.encode.remote(batch, size)

    def result(self, handle, batch: list) -> list[Result]:
        import ray

        try:
            return ray.get(handle)
        except Exception as exc:  # the actor died or raised: these samples failed, not the job
            detail = f"encoder actor failed: {type(exc).__name__}: {str(exc)[:300]}"
            return [("failed", "encode_error", f"{d.source}: {detail}") for d in batch]


class ShardTask:
    """`run(plan)` processes one shard and commits it; returns its stats."""

    def __init__(
        self,
        cfg: PrepConfig,
        out: str,
        fingerprint: str,
        actors: list | None = None,
        actor_model_ids: dict[str, Any] | None = None,
        run_id: str = "run",
    ):
        self.cfg = cfg
        self.store = OutputStore(out, cfg.storage.options, run_id=run_id)
        self.fingerprint = fingerprint
        self.actors = actors or []
        self.actor_model_ids = actor_model_ids or {}

    def _decoder(self):
        from preprocessing.process import Decoder

        threads = max(1, int(self.cfg.execution.cpus_per_worker))
        key = (self.cfg.video, self.cfg.image, threads)
        return _cached(
            "decoder", key, lambda: Decoder(self.cfg.video, self.cfg.image, decode_threads=threads)
        )

    def _batch_samples(self, kind: str) -> int:
        # models.batch_size counts frames per forward pass; send about that many per encode call.
        frames = self.cfg.video.frames if kind == "video" else 1
        return max(1, self.cfg.models.batch_size // frames)

    def _triage(self, plan: ShardPlan, kept_keys: set[str]) -> tuple[list[str], dict[int, Result]]:
        """Keys of every row, and the rows settled before any work (empty, duplicate, kept)."""
        keys, settled, first_row = [], {}, {}
        for pos, source in enumerate(plan.sources):
            key = sample_key(source) if source else ""
            keys.append(key)
            row = plan.first_row + pos
            if not source:
                column = "video" if plan.kind == "videos" else "image"
                settled[pos] = ("failed", "missing_file", f"manifest row {row}: the {column} column is empty")
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
        return keys, settled

    def _kept(self, plan: ShardPlan) -> set[str]:
        """`--retry-failed`: keys of the committed shard's ok rows (checked against the plan)."""
        rows = read_status(self.store, plan.kind, plan.index)
        if len(rows) != len(plan.sources) or any(
            r["source"] != s for r, s in zip(rows, plan.sources) if s is not None
        ):
            raise RuntimeError(
                f"{plan.kind}/{plan.index:06d}: the committed shard does not match the manifest rows; "
                "the manifest changed since it was written: rerun with --overwrite"
            )
        return {r["key"] for r in rows if r["status"] == "ok"}

    def run(self, plan: ShardPlan, retry: bool = False, task_offset: int = 0) -> dict[str, Any]:
        start = time.perf_counter()
        keep_heap_pages()
        timing = dict(fetch_s=0.0, decode_s=0.0, encode_s=0.0, write_s=0.0)
        kind = "video" if plan.kind == "videos" else "image"
        kept_keys = self._kept(plan) if retry else set()
        keys, settled = self._triage(plan, kept_keys)
        if retry:  # un-commit first: a crash while rewriting leaves a shard that is redone whole
            self.store.remove([self.store.shard_path(plan.kind, plan.index, "json")])
        old_samples = iter_tar_samples(self.store, plan.kind, plan.index) if retry else iter(())
        if self.actors:
            encode = ActorEncode(self.actors, task_offset, self.actor_model_ids)
        else:
            encode = LocalEncode(self.cfg)
        decoder = self._decoder()
        fetcher = Fetcher(self.cfg.http, self.cfg.storage.options)
        writer = ShardWriter(self.store, plan.kind, plan.index)
        resolved: dict[int, Result] = dict(settled)
        next_pos = 0

        def flush() -> None:
            nonlocal next_pos
            t = time.perf_counter()
            while next_pos in resolved:
                self._write(writer, plan, next_pos, keys[next_pos], resolved.pop(next_pos), old_samples)
                next_pos += 1
            timing["write_s"] += time.perf_counter() - t

        batch: list[tuple[int, Any]] = []
        in_flight: deque = deque()

        def send() -> None:
            t = time.perf_counter()
            in_flight.append((batch[:], encode.submit([d for _, d in batch], batch_samples)))
            batch.clear()
            timing["encode_s"] += time.perf_counter() - t

        def collect(limit: int) -> None:
            while len(in_flight) > limit:
                t = time.perf_counter()
                items, handle = in_flight.popleft()
                for (pos, _), res in zip(items, encode.result(handle, [d for _, d in items])):
                    resolved[pos] = res
                timing["encode_s"] += time.perf_counter() - t

        try:
            sources = [None if pos in settled else s for pos, s in enumerate(plan.sources)]
            fetched = fetcher.prefetch(sources)
            batch_samples = self._batch_samples(kind)
            for pos, source in enumerate(plan.sources):
                t = time.perf_counter()
                data, error = next(fetched)
                timing["fetch_s"] += time.perf_counter() - t
                if pos in settled:
                    flush()
                    continue
                if error is not None:
                    resolved[pos] = ("failed", error.reason, error.detail)
                else:
                    t = time.perf_counter()
                    resolved_or_decoded = self._decode(decoder, kind, source, plan.captions[pos], data)
                    timing["decode_s"] += time.perf_counter() - t
                    if isinstance(resolved_or_decoded, tuple):
                        resolved[pos] = resolved_or_decoded
                    else:
                        batch.append((pos, resolved_or_decoded))
                        if len(batch) >= batch_samples:
                            send()
                            collect(self.cfg.execution.batches_in_flight)
                flush()
            if batch:
                send()
            collect(0)
            flush()
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
                )
            )
        except BaseException:
            writer.abort()
            raise

    @staticmethod
    def _decode(decoder: Any, kind: str, source: str, caption: Any, data: bytes | None):
        try:
            return decoder.decode(kind, source, caption, data=data)
        except SampleError as exc:
            return ("failed", exc.reason, exc.detail)
        except Exception as exc:  # a bug on one odd file must not kill the shard
            last = traceback.format_exc().strip().splitlines()[-1]
            return ("failed", "internal_error", f"{source}: {type(exc).__name__}: {last[:300]}")

    def _write(
        self, writer: ShardWriter, plan: ShardPlan, pos: int, key: str, res: Result, old_samples
    ) -> None:
        source = plan.sources[pos] or ""
        caption = plan.captions[pos]
        caption = None if caption is None else str(caption)
        if res[0] == "kept":
            for old_key, members in old_samples:
                if old_key == key:
                    writer.add_ok(key, source, caption, members)
                    return
            raise RuntimeError(
                f"{plan.kind}/{plan.index:06d}: sample {key} is in the status table but not the tar"
            )
        if res[0] == "ok":
            writer.add_ok(res[1], source, caption, res[2])
        else:
            writer.add_failed(key, source, caption, res[1], res[2])
