"""The job, as steps run in order by `PrepJob.run`: Preflight, Cluster, Dispatch (per kind),
Finalize. Each step is a small class with one `run` method.

Why this shape (see also `pipeline/shard.py` and `pipeline/encode_clients.py`):
- A shard is the unit of work: one Ray task per shard, at most `execution.workers` in flight.
  Shard N is rows N*S..N*S+S-1, so a task's output depends only on its rows: retries and
  reruns are deterministic. The driver plans from file metadata only (footers, sizes, ETags:
  `pipeline/plan.py`); each shard task reads its own row ranges. CSV/JSONL are converted to
  parquet and duplicates found by Ray tasks before dispatch (plan_convert.py, dedupe.py).
- Decoding is CPU work inside the shard task (plus its isolated decoder child). The VAE and
  the semantic model live in encoder actors holding `execution.gpus_per_encoder` of a GPU:
  many shard tasks feed each actor and keep `batches_in_flight` batches queued there, so a
  GPU always has a batch waiting while CPUs decode the next ones.
- Shard tasks send batches to actors on their own Ray node when it has any; actors are async
  (`execution.encoder_concurrency` calls at once) and load models from local paths the driver
  resolved once (`pipeline/placement.py`).
- On a CPU-only cluster the default (`encoders: -1`) encodes inside the shard task instead:
  a CPU actor would only add a copy of every frame through the object store and a second
  process competing for the same cores. `execution.encoders: N` with `gpus_per_encoder: 0`
  still runs the actor design on CPUs (same code path as on GPUs).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from core.config import ConfigError
from core.shard_format import FORMAT_VERSION
from pipeline.completions import Completions
from pipeline.config import PrepConfig, output_config, public_config
from pipeline.dedupe import find_duplicates
from pipeline.encoder_actor import EncoderActor
from pipeline.lease import Lease
from pipeline.manifest import Manifest
from pipeline.placement import actor_env, check_decoder, check_devices, local_model_paths
from pipeline.plan import ShardPlanner
from pipeline.plan_convert import prune_plan
from pipeline.preflight import JobArgs, JobError, Preflight, Ready  # noqa: F401  (public names)
from pipeline.retry import TransientTaskError, retry_mode, shards_to_retry
from pipeline.shard import ShardTask
from pipeline.statistics import FactorStats
from pipeline.storage import KINDS, OutputStore, json_bytes
from pipeline.summary import KindStats, Summary
from pipeline.untrusted import redact_url


class Cluster:
    """Join the cluster (RAY_ADDRESS / `ray job submit`) or start a local one; start encoders."""

    def __init__(self, cfg: PrepConfig):
        self.cfg = cfg
        self.started_here = False
        self.model_ids: dict[str, Any] = {}
        self.actor_nodes: list[str] = []
        self.local_paths: dict[str, str] = {}

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
        check_devices(self.cfg, gpus, encoders)
        check_decoder(self.cfg)
        self.local_paths = local_model_paths(self.cfg)
        # A crash on one batch fails that batch only (no task retry) and the actor comes back.
        # Actors never reach the hub: they load what the driver fetched (`local_paths`).
        env = actor_env(self.cfg) if encoders else {}
        if self.local_paths:
            env["HF_HUB_OFFLINE"] = "1"
        actor_cls = ray.remote(EncoderActor).options(
            num_cpus=ex.cpus_per_encoder, num_gpus=ex.gpus_per_encoder, max_restarts=-1, max_task_retries=0,
            max_concurrency=ex.encoder_concurrency, runtime_env={"env_vars": env} if env else None,
        )
        actors = [actor_cls.remote(self.cfg, self.local_paths) for _ in range(encoders)]
        try:
            self.model_ids = ray.get(actors[0].model_ids.remote()) if actors else {}
            self.actor_nodes = ray.get([a.node_id.remote() for a in actors])
        except ray.exceptions.RayActorError as exc:  # the models or the GPU decoder cannot load
            for actor in actors:
                ray.kill(actor)
            raise JobError(f"the encoder actors cannot start: {str(exc)[-1500:]}") from None
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

    def __init__(self, cfg: PrepConfig, store: OutputStore, task_ref: Any, workers: int, retry_failed: bool,
                 lease: Lease | None = None):
        self.cfg, self.store, self.task_ref = cfg, store, task_ref
        self.workers, self.retry_failed, self.lease = workers, retry_failed, lease

    def run(self, manifest: Manifest, stats: KindStats) -> None:
        import ray
        from tqdm import tqdm

        kind = manifest.kind
        committed = self.store.committed(kind)  # the one listing of this kind's folder
        to_retry: set[int] = set()
        mode = retry_mode(self.retry_failed)  # pipeline/retry.py: which failures are redone
        if mode and committed:
            old = self.store.read_jsons([self.store.shard_path(kind, i, "json") for i in sorted(committed)])
            to_retry = shards_to_retry(old.values(), mode)
        # A task that failed outside its rows (actor death, storage) is retried whole.
        remote = ray.remote(_run_shard).options(num_cpus=self.cfg.execution.cpus_per_worker, max_retries=2,
                                                retry_exceptions=[TransientTaskError])
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
        pending = Completions()  # O(1) per completion, however many tasks are in flight
        start = time.perf_counter()

        def settle(block_until: int) -> None:
            while len(pending) > block_until:
                index, result, error = pending.next()
                if error is None:
                    stats.add_done(result)
                elif isinstance(error, Exception):  # the shard stays uncommitted; a rerun redoes it
                    stats.add_error(index, error)
                else:
                    raise error
                bar.update(1)
                bar.set_postfix(samples_s=f"{stats.rows_done / max(time.perf_counter() - start, 1e-9):.1f}")

        dups = self._duplicates(manifest, total or 0, committed, to_retry)
        for plan in ShardPlanner(manifest, self.cfg.samples_per_shard).run():
            retry = mode if plan.index in to_retry else False  # the task needs the mode
            if plan.index in committed and not retry:
                stats.skipped.append(plan.index)
                bar.update(1)
                continue
            plan.duplicates = dups.path(plan.index) if dups else None
            settle(self.workers - 1)
            if self.lease is not None:
                self.lease.check()
            pending.add(remote.remote(self.task_ref, plan, retry, plan.index), plan.index)
        settle(0)
        bar.close()
        stats.seconds = time.perf_counter() - start

    def _duplicates(self, manifest: Manifest, shards: int, committed: set[int], to_retry: set[int]):
        """The dedupe pass (pipeline/dedupe.py), when some shard is to be done and repeats may
        span shards (with one shard, the shard task finds them itself)."""
        if self.cfg.dedupe == "none" or shards < 2:
            return None
        if not any(i not in committed or i in to_retry for i in range(shards)):
            return None
        return find_duplicates(manifest, self.cfg.samples_per_shard)


def _index_row(kind: str, stats: dict[str, Any]) -> dict[str, Any]:
    return dict(kind=kind, shard=int(stats["shard"]), ok=int(stats["ok"]), failed=int(stats["failed"]),
                tar_bytes=int(stats.get("tar_bytes") or 0))


def _index_schema():
    import pyarrow as pa

    return pa.schema([("kind", pa.string()), ("shard", pa.int64()), ("ok", pa.int64()),
                      ("failed", pa.int64()), ("tar_bytes", pa.int64())])


class Finalize:
    """Totals over every committed shard (this run's and earlier ones) and the data statistics
    (percentiles of γm units and appearance change, pipeline/statistics.py) -> `dataset.json`."""

    def __init__(self, cfg: PrepConfig, ready: Ready, args: JobArgs):
        self.cfg, self.store, self.args, self.fingerprint = cfg, ready.store, args, ready.fingerprint
        self.ready = ready

    def write_dataset_json(
        self,
        totals: dict[str, Any] | None,
        model_ids: dict | None,
        complete: bool,
        statistics: tuple[dict[str, Any] | None, str] | None = None,
    ) -> None:
        old = self.store.read_json(self.store.path("dataset.json")) or {}
        params = self.cfg.manifest.redact_query_params  # a presigned manifest URL is stored redacted
        manifests = {
            k: (v and redact_url(v, params)) or (old.get("manifests") or {}).get(k)
            for k, v in self.args.manifests().items()
        }
        files = {**(old.get("manifest_files") or {}), **self._file_records()}
        doc = dict(
            format_version=FORMAT_VERSION,
            fingerprint=self.fingerprint,
            complete=complete,
            manifests=manifests,
            manifest_files=files,
            samples_per_shard=self.cfg.samples_per_shard,
            model_ids=model_ids or old.get("model_ids"),
            totals=totals or old.get("totals"),
            output_config=output_config(self.cfg),
            config=public_config(self.cfg),
            updated_at=time.time(),
        )
        # Training copies these into its checkpoints (core/statistics.py): sampling defaults and
        # γm / γa range warnings. None with the reason when they cannot be computed.
        if statistics is None:
            statistics = (old.get("statistics"), old.get("statistics_note"))
        stats, why = statistics
        doc["statistics"] = stats
        if stats is None and why:
            doc["statistics_note"] = why
        self.store.write_atomic(self.store.path("dataset.json"), json_bytes(doc))

    def _file_records(self) -> dict[str, list[dict[str, Any]]]:
        """The start-of-run records, with CSV/JSONL row counts filled in once converted."""
        return {kind: manifest.file_records() for kind, manifest in self.ready.manifests.items()}

    def run(self, summary: Summary) -> None:
        model_ids, statistics = None, (None, "no video shards")
        index_rows: list[dict[str, Any]] = []
        for kind in KINDS:
            committed = sorted(self.store.committed(kind))
            run = summary.kinds.get(kind)
            known = {i: s for i, s in (run.shard_stats if run else {}).items() if i in committed}
            factors = run.factor_stats if run else FactorStats()
            shard_stats = dict(known)
            missing = [i for i in committed if i not in known]
            for start in range(0, len(missing), 1024):  # earlier runs' shards, a chunk at a time
                chunk = [self.store.shard_path(kind, i, "json") for i in missing[start : start + 1024]]
                for stats in self.store.read_jsons(chunk).values():
                    factors.add(stats)
                    stats.pop("factors", None)  # merged: the driver keeps O(shards)
                    shard_stats[int(stats["shard"])] = stats
            summary.totals[kind] = KindStats.totals([shard_stats[i] for i in committed if i in shard_stats])
            model_ids = model_ids or next((s.get("model_ids") for s in shard_stats.values()), None)
            index_rows += [_index_row(kind, shard_stats[i]) for i in committed if i in shard_stats]
            if kind == "videos" and committed:
                statistics = factors.result(self.cfg.video.width, self.cfg.video.height)
        self.write_index(index_rows)
        self.write_dataset_json(summary.totals, model_ids, complete=summary.complete, statistics=statistics)
        self.store.clean_tmp()
        if summary.complete:  # conversions and dedupe results of files no longer in the manifests
            prune_plan(self.store, list(self.ready.manifests.values()), self.cfg.samples_per_shard)

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

    def dry_run(self) -> tuple[str, bool]:
        """(the plan as a table, whether the real run would start): writes nothing."""
        ready = Preflight(self.cfg, self.args).run()
        size = self.cfg.samples_per_shard
        lines = [f"plan for {self.args.out} ({size} rows per shard)",
                 f"{'kind':<7} {'files':>6} {'rows':>12} {'shards':>8} {'committed':>10} {'to do':>8}  note"]
        for kind, manifest in ready.manifests.items():
            counts = [f["rows"] for f in ready.files[kind]]
            rows = sum(counts) if None not in counts else None
            shards = -(-rows // size) if rows is not None else None
            check = ready.checks.get(kind)
            committed = ready.store.committed(kind) - (check.redo if check else set())
            if shards is not None:
                committed = {i for i in committed if i < shards}
            todo = shards - len(committed) if shards is not None else None
            note = (f"changed: {check.changed_file} ({check.change})" if check and check.change else
                    f"{len(check.appended)} file(s) appended" if check and check.appended else "")
            fmt = lambda v: "?" if v is None else str(v)  # CSV/JSONL rows are unknown until streamed
            lines.append(f"{kind:<7} {len(manifest.files):>6} {fmt(rows):>12} {fmt(shards):>8} "
                         f"{len(committed):>10} {fmt(todo):>8}  {note}")
        lines += [f"would refuse: {p}" for p in ready.problems]
        return "\n".join(lines), not ready.problems

    def run(self) -> Summary:
        import ray

        ready = Preflight(self.cfg, self.args).run()
        store, fingerprint, lease = ready.store, ready.fingerprint, ready.lease
        cluster = Cluster(self.cfg)
        actors: list = []
        try:
            finalize = Finalize(self.cfg, ready, self.args)
            finalize.write_dataset_json(None, None, complete=False)  # claims OUT for this fingerprint
            workers, actors = cluster.run()
            for manifest in ready.manifests.values():
                manifest.convert()  # CSV/JSONL -> parquet under OUT/_plan (Ray tasks), once
            finalize.write_dataset_json(None, None, complete=False)  # now with their row counts
            summary = Summary(out=self.args.out, workers=workers, encoders=len(actors))
            task = ShardTask(self.cfg, self.args.out, fingerprint, actors, cluster.model_ids,
                             cluster.actor_nodes, cluster.local_paths, run_id=lease.run_id)
            dispatch = Dispatch(self.cfg, store, ray.put(task), workers, self.args.retry_failed, lease)
            for kind, manifest in ready.manifests.items():
                dispatch.run(manifest, summary.kind(kind))
            finalize.run(summary)
        finally:
            cluster.shutdown(actors)
            lease.release()
        return summary
