"""The job, as steps run in order by `PrepJob.run`: Preflight, Cluster, Dispatch (per kind),
Finalize. Each step is a small class with one `run` method.

Why this shape (see also `pipeline/shard.py`):
- A shard is the unit of work: one Ray task per shard, at most `execution.workers` in flight.
  Shard N is rows N*S..N*S+S-1, so a task's output depends only on its rows: retries and
  reruns are deterministic, and the driver only streams the manifest and counts.
- Decoding is CPU work inside the shard task (plus its isolated decoder child). The VAE and
  the semantic model live in encoder actors holding `execution.gpus_per_encoder` of a GPU:
  many shard tasks feed each actor and keep `batches_in_flight` batches queued there, so a
  GPU always has a batch waiting while CPUs decode the next ones.
- On a CPU-only cluster the default (`encoders: -1`) encodes inside the shard task instead:
  a CPU actor would only add a copy of every frame through the object store and a second
  process competing for the same cores. `execution.encoders: N` with `gpus_per_encoder: 0`
  still runs the actor design on CPUs (same code path as on GPUs).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Any

from core.config import ConfigError
from core.shard_format import FORMAT_VERSION
from pipeline.config import PrepConfig, output_config, prep_fingerprint, public_config
from pipeline.manifest import Manifest, SeenSources, ShardPlanner
from pipeline.shard import EncoderActor, ShardTask
from pipeline.storage import KINDS, OutputStore, json_bytes
from pipeline.summary import KindStats, Summary


class JobError(RuntimeError):
    """The job cannot start; the message says what to change."""


@dataclass
class JobArgs:
    out: str
    videos: str | None = None
    images: str | None = None
    overwrite: bool = False
    retry_failed: bool = False

    def manifests(self) -> dict[str, str | None]:
        return {"videos": self.videos, "images": self.images}


class Preflight:
    """Everything that can fail before work starts: manifests, columns, output, fingerprint."""

    def __init__(self, cfg: PrepConfig, args: JobArgs):
        self.cfg, self.args = cfg, args

    def run(self) -> tuple[dict[str, Manifest], OutputStore, str]:
        if not self.args.videos and not self.args.images:
            raise JobError("nothing to do: pass --videos MANIFEST and/or --images MANIFEST")
        opts = self.cfg.storage.options
        manifests = {
            kind: Manifest(url, kind, self.cfg.manifest, opts)
            for kind, url in self.args.manifests().items()
            if url
        }
        store = OutputStore(self.args.out, opts)
        store.check_writable()
        fingerprint = prep_fingerprint(self.cfg)
        if self.args.overwrite:
            for kind in KINDS:
                store.remove_shards(kind)
            store.remove([p for p in [store.path("dataset.json")] if store.fs.exists(p)])
        else:
            self._check_existing(store, fingerprint)
        return manifests, store, fingerprint

    def _check_existing(self, store: OutputStore, fingerprint: str) -> None:
        old = store.read_json(store.path("dataset.json"))
        if old is None:
            # No dataset.json but committed shards: compare with one shard's own fingerprint.
            for kind in KINDS:
                done = sorted(store.committed(kind))
                if done:
                    old = store.read_json(store.shard_path(kind, done[0], "json"))
                    break
        if old is None:
            return
        if old.get("fingerprint") != fingerprint:
            raise JobError(
                f"{self.args.out} was written with a different config (fingerprint {old.get('fingerprint')}, "
                f"now {fingerprint}); its shards would mix two settings. Rerun with the same config, "
                "choose another --out, or pass --overwrite to delete them and start again"
            )
        for kind, url in self.args.manifests().items():
            before = (old.get("manifests") or {}).get(kind)
            if url and before and before != url:
                raise JobError(
                    f"{self.args.out}/{kind} was written from manifest {before}, not {url}; "
                    "pass the same manifest to resume, or --overwrite to start again"
                )


class Cluster:
    """Join the cluster (RAY_ADDRESS / `ray job submit`) or start a local one; start encoders."""

    def __init__(self, cfg: PrepConfig):
        self.cfg = cfg
        self.started_here = False
        self.model_ids: dict[str, Any] = {}

    def run(self) -> tuple[int, list]:
        import ray

        ex = self.cfg.execution
        if not ray.is_initialized():
            address = os.environ.get("RAY_ADDRESS")
            if address:
                ray.init(address=address)
            else:
                ray.init(address="local", num_cpus=ex.local_cpus or None, include_dashboard=False)
            self.started_here = True
        resources = ray.cluster_resources()
        cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
        encoders = ex.encoders
        if encoders == -1:
            encoders = int(gpus // ex.gpus_per_encoder) if gpus and ex.gpus_per_encoder else 0
        reserved = encoders * ex.cpus_per_encoder
        workers = ex.workers or int((cpus - reserved) // ex.cpus_per_worker)
        if workers < 1 or reserved + ex.cpus_per_worker > cpus:
            raise ConfigError(
                f"config field 'execution': the cluster has {cpus:g} CPUs; {encoders} encoder actors reserve "
                f"{reserved:g} and a shard task needs {ex.cpus_per_worker:g}. Lower execution.encoders or "
                "execution.cpus_per_encoder"
            )
        if encoders and ex.gpus_per_encoder > gpus:
            raise ConfigError(
                f"config field 'execution.gpus_per_encoder': {ex.gpus_per_encoder:g} GPUs per "
                f"encoder but the cluster has {gpus:g}; set it to 0 for CPU encoder actors"
            )
        # A crash on one batch fails that batch only (no task retry) and the actor comes back.
        actor_cls = ray.remote(EncoderActor).options(
            num_cpus=ex.cpus_per_encoder, num_gpus=ex.gpus_per_encoder, max_restarts=-1, max_task_retries=0
        )
        actors = [actor_cls.remote(self.cfg) for _ in range(encoders)]
        self.model_ids = ray.get(actors[0].model_ids.remote()) if actors else {}
        return workers, actors

    def shutdown(self, actors: list) -> None:
        import ray

        for actor in actors:
            ray.kill(actor)
        if self.started_here:
            ray.shutdown()


def _run_shard(task: ShardTask, plan, retry: bool, offset: int) -> dict[str, Any]:
    return task.run(plan, retry=retry, task_offset=offset)


class Dispatch:
    """Stream one manifest into shard tasks, `workers` in flight; skip committed shards."""

    def __init__(self, cfg: PrepConfig, store: OutputStore, task_ref: Any, workers: int, retry_failed: bool):
        self.cfg, self.store, self.task_ref = cfg, store, task_ref
        self.workers, self.retry_failed = workers, retry_failed

    def run(self, manifest: Manifest, stats: KindStats) -> None:
        import ray
        from tqdm import tqdm

        kind = manifest.kind
        committed = self.store.committed(kind)  # the one listing of this kind's folder
        to_retry: set[int] = set()
        if self.retry_failed and committed:
            old = self.store.read_jsons([self.store.shard_path(kind, i, "json") for i in sorted(committed)])
            to_retry = {int(s["shard"]) for s in old.values() if s.get("failed")}
        remote = ray.remote(_run_shard).options(num_cpus=self.cfg.execution.cpus_per_worker, max_retries=2)
        rows = manifest.count_rows()
        total = -(-rows // self.cfg.samples_per_shard) if rows is not None else None
        bar = tqdm(
            total=total,
            unit="shard",
            desc=kind,
            disable=not self.cfg.execution.progress,
            file=sys.stderr,
            mininterval=1.0,
        )
        pending: dict[Any, int] = {}
        start = time.perf_counter()

        def settle(block_until: int) -> None:
            while len(pending) > block_until:
                done, _ = ray.wait(list(pending), num_returns=1)
                index = pending.pop(done[0])
                try:
                    stats.add_done(ray.get(done[0]))
                except Exception as exc:  # the shard stays uncommitted; a rerun redoes it
                    stats.add_error(index, exc)
                bar.update(1)
                bar.set_postfix(samples_s=f"{stats.rows_done / max(time.perf_counter() - start, 1e-9):.1f}")

        seen = SeenSources()
        for plan in ShardPlanner(manifest, self.cfg.samples_per_shard).run():
            seen.mark(plan)  # committed shards too: the first row of a source keeps its key
            retry = plan.index in to_retry
            if plan.index in committed and not retry:
                stats.skipped.append(plan.index)
                bar.update(1)
                continue
            settle(self.workers - 1)
            pending[remote.remote(self.task_ref, plan, retry, plan.index)] = plan.index
        settle(0)
        bar.close()
        stats.seconds = time.perf_counter() - start


def _index_row(kind: str, stats: dict[str, Any]) -> dict[str, Any]:
    return dict(kind=kind, shard=int(stats["shard"]), ok=int(stats["ok"]), failed=int(stats["failed"]),
                tar_bytes=int(stats.get("tar_bytes") or 0))


def _index_schema():
    import pyarrow as pa

    return pa.schema([("kind", pa.string()), ("shard", pa.int64()), ("ok", pa.int64()),
                      ("failed", pa.int64()), ("tar_bytes", pa.int64())])


class Finalize:
    """Totals over every committed shard (this run's and earlier ones) -> `dataset.json`."""

    def __init__(self, cfg: PrepConfig, store: OutputStore, args: JobArgs, fingerprint: str):
        self.cfg, self.store, self.args, self.fingerprint = cfg, store, args, fingerprint

    def write_dataset_json(
        self, totals: dict[str, Any] | None, model_ids: dict | None, complete: bool
    ) -> None:
        old = self.store.read_json(self.store.path("dataset.json")) or {}
        manifests = {k: v or (old.get("manifests") or {}).get(k) for k, v in self.args.manifests().items()}
        doc = dict(
            format_version=FORMAT_VERSION,
            fingerprint=self.fingerprint,
            complete=complete,
            manifests=manifests,
            samples_per_shard=self.cfg.samples_per_shard,
            model_ids=model_ids or old.get("model_ids"),
            totals=totals or old.get("totals"),
            output_config=output_config(self.cfg),
            config=public_config(self.cfg),
            updated_at=time.time(),
        )
        self.store.write_atomic(self.store.path("dataset.json"), json_bytes(doc))

    def run(self, summary: Summary) -> None:
        model_ids = None
        index_rows: list[dict[str, Any]] = []
        for kind in KINDS:
            committed = sorted(self.store.committed(kind))
            known = summary.kinds[kind].shard_stats if kind in summary.kinds else {}
            missing = [self.store.shard_path(kind, i, "json") for i in committed if i not in known]
            shard_stats = {**{int(s["shard"]): s for s in self.store.read_jsons(missing).values()}, **known}
            summary.totals[kind] = KindStats.totals([shard_stats[i] for i in committed if i in shard_stats])
            model_ids = model_ids or next((s.get("model_ids") for s in shard_stats.values()), None)
            index_rows += [_index_row(kind, shard_stats[i]) for i in committed if i in shard_stats]
        self.write_index(index_rows)
        self.write_dataset_json(summary.totals, model_ids, complete=summary.complete)
        self.store.clean_tmp()

    def write_index(self, rows: list[dict[str, Any]]) -> None:
        """`OUT/index.parquet`: one row per committed shard, so readers (training's weighted shard
        draws, DuckDB, pyarrow) never list folders or open every stats json."""
        import io

        import pyarrow as pa
        import pyarrow.parquet as pq

        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, schema=_index_schema()), buf)
        self.store.write_atomic(self.store.path("index.parquet"), buf.getvalue())


class PrepJob:
    def __init__(self, cfg: PrepConfig, args: JobArgs):
        self.cfg, self.args = cfg, args

    def run(self) -> Summary:
        import ray

        manifests, store, fingerprint = Preflight(self.cfg, self.args).run()
        finalize = Finalize(self.cfg, store, self.args, fingerprint)
        finalize.write_dataset_json(None, None, complete=False)  # claims OUT for this fingerprint
        cluster = Cluster(self.cfg)
        workers, actors = cluster.run()
        summary = Summary(out=self.args.out, workers=workers, encoders=len(actors))
        try:
            task_ref = ray.put(ShardTask(self.cfg, self.args.out, fingerprint, actors, cluster.model_ids))
            dispatch = Dispatch(self.cfg, store, task_ref, workers, self.args.retry_failed)
            for kind, manifest in manifests.items():
                dispatch.run(manifest, summary.kind(kind))
            finalize.run(summary)
        finally:
            cluster.shutdown(actors)
        return summary
