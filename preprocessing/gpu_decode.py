"""`video.decoder: nvdec`: decode inside the encoder actor, so frames never leave the GPU.

The shard task has already opened the file in its isolated child (`VideoDecoderProcess.probe`:
frame indices, original size, crop box), so a hostile container fails there. The actor gets
the encoded bytes (or a local path) and those indices, decodes them on its GPU, crops and
resizes there with the same geometry as the CPU path (`transform.resize_cover` of the region
`video.send_region` picks), and hands uint8 [F,H,W,3] device tensors to the `Encoder`.

Implementations, in order: PyNvVideoCodec (NVIDIA's bindings, as NeMo Curator and
cosmos-curate use), else torchcodec's CUDA device (its NVDEC backend). On a CPU device the
torchcodec path runs unchanged, which is how the tests exercise this code without a GPU.
A file the GPU decoder rejects is decoded by the actor's own isolated CPU child instead, and
the sample's KEY.json records why (`decoder_fallback`).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch
import torch.nn.functional as F

from core.geometry import cover_crop
from preprocessing.settings import VideoConfig
from preprocessing.video import send_region


def available_impl(device: str) -> str | None:
    """Which GPU decoder can run for `device`: `pynvvideocodec`, `torchcodec`, or None."""
    if device.startswith("cuda") and importlib.util.find_spec("PyNvVideoCodec") is not None:
        return "pynvvideocodec"
    if importlib.util.find_spec("torchcodec") is not None:
        return "torchcodec"
    return None


def resize_cover_tensor(x: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """uint8 [N,3,h,w] (any device) -> uint8 [N,height,width,3]: resize to cover, centre crop.

    The same sizes and filter (antialiased bilinear) as `transform.resize_cover`; CUDA has no
    uint8 kernel, so there it runs in float32 and rounds."""
    h, w = x.shape[-2:]
    scale = max(width / w, height / h)
    rw, rh = max(width, round(w * scale)), max(height, round(h * scale))
    if (rh, rw) != (h, w):
        if x.device.type == "cpu":
            x = F.interpolate(x.contiguous(memory_format=torch.channels_last), size=(rh, rw),
                              mode="bilinear", antialias=True, align_corners=False)
        else:
            y = F.interpolate(x.float(), size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)
            x = y.round_().clamp_(0, 255).to(torch.uint8)
    left, top = (rw - width) // 2, (rh - height) // 2
    return x[:, :, top : top + height, left : left + width].permute(0, 2, 3, 1).contiguous()


class FrameDecoder:
    """Decodes a probed clip on `device`; raises on any failure (the caller falls back)."""

    def __init__(self, cfg: VideoConfig, device: str, impl: str | None = None):
        self.cfg, self.device = cfg, device
        self.impl = impl or available_impl(device)
        if self.impl is None:
            raise RuntimeError(
                "config field 'video.decoder': nvdec needs PyNvVideoCodec or torchcodec in the encoder "
                "actors' environment (`pip install torchcodec`), or set video.decoder=decord"
            )

    @property
    def name(self) -> str:
        return f"nvdec:{self.impl}" if self.device.startswith("cuda") else f"{self.impl}:{self.device}"

    def _frames_torchcodec(self, source: str | bytes, indices: list[int]) -> torch.Tensor:
        from torchcodec import decoders

        backend = getattr(decoders, "set_cuda_backend", None)
        first = None
        if backend is not None and self.device.startswith("cuda"):
            try:
                with backend("beta"):  # torchcodec's own NVDEC path, independent of FFmpeg's hwaccel
                    dec = decoders.VideoDecoder(source, device=self.device, seek_mode="exact")
                return dec.get_frames_at(indices).data
            except Exception as exc:  # next: FFmpeg's NVDEC (needs an FFmpeg built with cuvid)
                first = f"beta backend: {type(exc).__name__}: {str(exc)[:150]}"
        try:
            dec = decoders.VideoDecoder(source, device=self.device, seek_mode="exact")
            return dec.get_frames_at(indices).data  # uint8 [F,3,H,W] on the device
        except Exception as exc:
            if first is None:
                raise
            raise RuntimeError(f"{first}; ffmpeg backend: {type(exc).__name__}: {str(exc)[:150]}") from None

    def _frames_pynvvideocodec(self, source: str | bytes, indices: list[int]) -> torch.Tensor:
        import tempfile

        import PyNvVideoCodec as nvc

        if isinstance(source, bytes):  # SimpleDecoder reads files: bytes from another node go to RAM disk
            shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
            with tempfile.NamedTemporaryFile(dir=shm, suffix=".video") as fh:
                fh.write(source)
                fh.flush()
                return self._frames_pynvvideocodec(fh.name, indices)
        gpu = int(self.device.split(":")[1]) if ":" in self.device else torch.cuda.current_device()
        dec = nvc.SimpleDecoder(source, gpu_id=gpu, use_device_memory=True,
                                output_color_type=nvc.OutputColorType.RGBP)
        frames = dec.get_batch_frames_by_index(indices)
        return torch.stack([torch.from_dlpack(f) for f in frames]).to(self.device)  # [F,3,H,W]

    def decode(self, source: str | bytes, meta: dict[str, Any]) -> torch.Tensor:
        """uint8 [F,H,W,3] on the device for the probed clip `meta` (indices, original size)."""
        indices = list(meta["frame_indices"])
        get = self._frames_pynvvideocodec if self.impl == "pynvvideocodec" else self._frames_torchcodec
        frames = get(source, indices)
        src_w, src_h = meta["original_size"]
        if tuple(frames.shape) != (len(indices), 3, src_h, src_w):
            raise RuntimeError(f"decoded {tuple(frames.shape)}, expected {len(indices)} frames of "
                               f"3x{src_h}x{src_w}")
        x0, y0, x1, y1 = send_region(cover_crop(src_w, src_h, self.cfg.width, self.cfg.height))
        return resize_cover_tensor(frames[:, :, y0:y1, x0:x1], self.cfg.width, self.cfg.height)
