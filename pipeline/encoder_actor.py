"""`EncoderActor`: the VAE and the semantic model in one (GPU or CPU) process, shared by many
shard tasks (see `pipeline/runner.py` for how many and where).

The actor is async: Ray runs up to `execution.encoder_concurrency` calls at once, each in its
own thread and (on CUDA) its own stream, so one call's host-to-device copy, another's forward
pass and a third's serialisation of results overlap. Calls are independent: a sample's bytes
never depend on what runs beside it.

With `video.decoder: nvdec` the batch holds probed clips without pixels: they are decoded here
on the GPU (`preprocessing.gpu_decode`); a file the GPU decoder rejects is decoded by this
actor's own isolated CPU child, and the sample records the reason (`decoder_fallback`).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from pipeline.config import PrepConfig
from pipeline.encode_clients import Result, encode_results
from pipeline.worker_env import keep_heap_pages, set_torch_threads


class EncoderActor:
    def __init__(self, cfg: PrepConfig, local_paths: dict[str, str] | None = None):
        from preprocessing.process import Encoder

        keep_heap_pages()
        set_torch_threads(cfg.execution.cpus_per_encoder)
        self.cfg = cfg
        self.encoder = Encoder(cfg.models, local_paths=local_paths)
        self._frames = None  # GPU frame decoder, built on the first probed clip
        self._cpu_child = None  # isolated CPU fallback decoder
        self._decode_lock = threading.Lock()  # one fallback child, used by one call at a time
        self._streams = threading.local()
        if cfg.video.decoder == "nvdec":  # fail here, once, not on every clip
            self._frames = _gpu_frame_decoder(cfg.video, self.encoder.device)

    def encode_sync(self, batch: list, size: int) -> list[Result]:
        stream = self._stream()
        if stream is None:
            return self._encode(batch, size)
        import torch

        with torch.cuda.stream(stream):
            return self._encode(batch, size)

    def _encode(self, batch: list, size: int) -> list[Result]:
        from core.shard_format import SampleError

        ready = self._with_pixels(batch)
        good = [d for d in ready if not isinstance(d.pixels, SampleError)]
        encoded = iter(encode_results(self.encoder, good, size) if good else [])
        failed = lambda e: ("failed", e.reason, e.detail, e.meta)  # noqa: E731
        return [failed(d.pixels) if isinstance(d.pixels, SampleError) else next(encoded) for d in ready]

    async def encode(self, batch: list, size: int) -> list[Result]:
        return await asyncio.to_thread(self.encode_sync, batch, size)

    def model_ids(self) -> dict[str, Any]:
        return self.encoder.model_ids

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def _stream(self):
        if not self.encoder.device.startswith("cuda"):
            return None
        import torch

        if getattr(self._streams, "stream", None) is None:
            self._streams.stream = torch.cuda.Stream(device=self.encoder.device)
        return self._streams.stream

    # -- video.decoder=nvdec: decode probed clips here ------------------------------------
    def _with_pixels(self, batch: list) -> list:
        return [d if d.pixels is not None else self._decode_here(d) for d in batch]

    def _decode_here(self, d):
        from dataclasses import replace

        from core.shard_format import SampleError
        from preprocessing.gpu_decode import FrameDecoder

        try:
            if self._frames is None:
                self._frames = FrameDecoder(self.cfg.video, self.encoder.device)
            pixels = self._frames.decode(d.data if d.data is not None else d.source, d.meta)
            return replace(d, pixels=pixels, data=None, meta={**d.meta, "decoder": self._frames.name})
        except Exception as exc:  # the GPU decoder rejected the file: the isolated CPU child decodes it
            reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            try:
                pixels, meta = self._cpu_decode(d)
            except SampleError as err:
                return replace(d, pixels=err, data=None)
            meta = {**d.meta, **meta, "decoder": "decord", "decoder_fallback": reason[:300]}
            return replace(d, pixels=pixels, data=None, meta=meta)

    def _cpu_decode(self, d):
        from preprocessing.isolation import VideoDecoderProcess

        with self._decode_lock:
            if self._cpu_child is None:
                self._cpu_child = VideoDecoderProcess(self.cfg.video, threads=1, backend="decord")
            return self._cpu_child.decode(d.source, d.key, d.data)


def _gpu_frame_decoder(video, device: str):
    """The nvdec frame decoder, its library loaded now; RuntimeError naming video.decoder."""
    from preprocessing.backends import import_backend
    from preprocessing.gpu_decode import FrameDecoder

    frames = FrameDecoder(video, device)
    if frames.impl == "torchcodec":
        try:
            import_backend("torchcodec")
        except Exception as exc:
            raise RuntimeError(
                f"config field 'video.decoder': nvdec cannot load torchcodec in the encoder actor "
                f"({type(exc).__name__}: {str(exc)[:300]}); install FFmpeg 4-8 libraries or PyAV, "
                "or set video.decoder=decord"
            ) from None
    return frames
