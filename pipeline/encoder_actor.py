"""`EncoderActor`: the VAE and the semantic model in one (GPU or CPU) process, shared by many
shard tasks (see `pipeline/runner.py` for how many and where)."""

from __future__ import annotations

from typing import Any

from pipeline.config import PrepConfig
from pipeline.encode_clients import Result, encode_results
from pipeline.worker_env import keep_heap_pages, set_torch_threads


class EncoderActor:
    def __init__(self, cfg: PrepConfig):
        from preprocessing.process import Encoder

        keep_heap_pages()
        set_torch_threads(cfg.execution.cpus_per_encoder)
        self.encoder = Encoder(cfg.models)

    def encode(self, batch: list, size: int) -> list[Result]:
        return encode_results(self.encoder, batch, size)

    def model_ids(self) -> dict[str, Any]:
        return self.encoder.model_ids
