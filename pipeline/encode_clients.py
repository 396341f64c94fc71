"""How a shard task gets its decoded batches encoded: here (`LocalEncode`) or by the encoder
actors (`ActorEncode`). Both have `submit(batch, size) -> handle` and `result(handle, batch)`.

Result of one row: ("ok", key, members) | ("failed", reason, detail[, meta]) | ("kept", key);
`meta` is what is known of a failed source (`SampleError.meta`: its status columns).

An encoder actor that dies fails the whole shard task (`TransientTaskError`, retried by Ray):
its batch's rows say nothing about the data, so they are never committed as failures.
"""

from __future__ import annotations

from typing import Any

from core.shard_format import SampleError
from pipeline.config import PrepConfig
from pipeline.retry import TransientTaskError
from pipeline.worker_cache import WORKER_CACHE
from pipeline.worker_env import set_torch_threads

Result = tuple
# How long a task whose actor died waits for Ray to restart it before raising: a retry that
# found the actor still restarting would fail at once and use up the task's retries.
ACTOR_RESTART_WAIT_S = 120.0


def encode_results(encoder: Any, batch: list, size: int) -> list[Result]:
    """Encode `batch` padded to exactly `size` samples (copies of its last one, dropped after):
    kernels choose algorithms by batch size, so a sample's bytes must not depend on how many
    neighbours it had (a short last batch, rows failed or kept by --retry-failed)."""
    padded = batch + [batch[-1]] * (size - len(batch))
    out: list[Result] = []
    for rec in encoder.encode(padded)[: len(batch)]:
        if isinstance(rec, SampleError):
            out.append(("failed", rec.reason, rec.detail, rec.meta))
        else:
            out.append(("ok", rec.key, rec.members()))
    return out


class LocalEncode:
    """Encode inside the shard task (CPU-only clusters): no pixels cross processes."""

    def __init__(self, cfg: PrepConfig, local_paths: dict[str, str] | None = None):
        from preprocessing.process import Encoder

        set_torch_threads(cfg.execution.cpus_per_worker)
        self.encoder = WORKER_CACHE.get(
            "encoder", (cfg.models, local_paths), lambda: Encoder(cfg.models, local_paths=local_paths)
        )
        self.model_ids = self.encoder.model_ids

    def submit(self, batch: list, size: int) -> list[Result]:
        return encode_results(self.encoder, batch, size)

    def result(self, handle: list[Result], batch: list) -> list[Result]:
        return handle


class ActorEncode:
    """Round-robin over the encoder actors on this task's Ray node (any actor only when the
    node has none: on a 125-node cluster, cluster-wide round-robin would send ~124/125 of the
    batches across the network); results are awaited in submission order."""

    def __init__(self, actors: list, offset: int, model_ids: dict[str, Any],
                 actor_nodes: list[str] | None = None, node: str | None = None):
        # model_ids come from the driver: asking an actor would queue behind its backlog.
        nodes = actor_nodes or []
        local = [a for a, n in zip(actors, nodes) if node is not None and n == node]
        self.actors = local or actors
        self.same_node = bool(local)
        self.turn = offset
        self.model_ids = model_ids
        self._sent: dict[Any, Any] = {}  # object ref -> the actor it went to

    def submit(self, batch: list, size: int):
        actor = self.actors[self.turn % len(self.actors)]
        self.turn += 1
        if not self.same_node:  # a local path means nothing on another node: send the bytes
            batch = [_with_bytes(d) for d in batch]
        handle = actor.encode.remote(batch, size)
        self._sent[handle] = actor
        return handle

    def result(self, handle, batch: list) -> list[Result]:
        import ray

        actor = self._sent.pop(handle, None)
        try:
            return ray.get(handle)
        except ray.exceptions.RayActorError as exc:  # infrastructure: the task is retried whole
            if actor is not None:
                _await_restart(actor, ACTOR_RESTART_WAIT_S)
            raise TransientTaskError(
                f"encoder actor died: {type(exc).__name__}: {str(exc)[:300]}; the shard task is retried"
            ) from None
        except Exception as exc:  # the actor's call raised: these samples failed, not the job
            detail = f"encoder actor failed: {type(exc).__name__}: {str(exc)[:300]}"
            return [("failed", "encode_error", f"{d.source}: {detail}") for d in batch]


def _await_restart(actor: Any, seconds: float) -> None:
    """Return once `actor` answers again (Ray restarts it: `max_restarts=-1`), or after `seconds`."""
    import time

    import ray

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            ray.get(actor.node_id.remote(), timeout=min(10.0, max(0.1, deadline - time.monotonic())))
            return
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            time.sleep(0.5)


def _with_bytes(d: Any) -> Any:
    """A probed clip (GPU decode on the actor) with its file's bytes instead of a local path."""
    if getattr(d, "pixels", True) is not None or d.data is not None:
        return d
    from dataclasses import replace

    from preprocessing.process import read_local

    try:
        return replace(d, data=read_local(d.source))
    except SampleError:  # gone since the probe: the actor's decode fails and names the file
        return d
