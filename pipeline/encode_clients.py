"""How a shard task gets its decoded batches encoded: here (`LocalEncode`) or by the encoder
actors (`ActorEncode`). Both have `submit(batch, size) -> handle` and `result(handle, batch)`.

Result of one row: ("ok", key, members) | ("failed", reason, detail) | ("kept", key).
"""

from __future__ import annotations

from typing import Any

from core.shard_format import SampleError
from pipeline.config import PrepConfig
from pipeline.worker_cache import WORKER_CACHE
from pipeline.worker_env import set_torch_threads

Result = tuple


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


class LocalEncode:
    """Encode inside the shard task (CPU-only clusters): no pixels cross processes."""

    def __init__(self, cfg: PrepConfig):
        from preprocessing.process import Encoder

        set_torch_threads(cfg.execution.cpus_per_worker)
        self.encoder = WORKER_CACHE.get("encoder", cfg.models, lambda: Encoder(cfg.models))
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
