"""CPU video decoder backends of the isolated child (`video.decoder: decord | torchcodec`), the
FFmpeg libraries torchcodec needs, and the preflight check of the configured backend.

Both readers expose the same three things to `preprocessing.video`: `n_frames`, `fps` and
`get_batch(indices) -> uint8 [k,H,W,3]`. The child imports exactly one backend (torchcodec
brings torch, ~1 GB of address space, which the decord child never maps).

torchcodec loads FFmpeg 4-8 shared libraries by their plain names (`libavutil.so.60`). A
machine without a system FFmpeg still has one: PyAV's wheel bundles FFmpeg under mangled names
(`av.libs/libavutil-5809ad29.so.60`). `ffmpeg_library_dir` links those under the plain names in
a cache folder that the child finds through LD_LIBRARY_PATH (read by the loader at exec, so it
must be set when the child starts); torchcodec and PyAV then share one copy of FFmpeg.
"""

from __future__ import annotations

import ctypes.util
import hashlib
import importlib.util
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

CPU_DECODERS = ("decord", "torchcodec")
_MANGLED = re.compile(
    r"^(lib(?:avutil|avcodec|avformat|avfilter|avdevice|swscale|swresample))-[0-9a-f]{8}\.so\.(\d+)"
)


class BackendUnavailable(RuntimeError):
    """The configured decoder backend cannot run here; the message names the setting and the fix."""


class DecordReader:
    def __init__(self, source: Any, threads: int):
        import decord

        self._reader = decord.VideoReader(source, num_threads=threads)
        self.n_frames, self.fps = len(self._reader), float(self._reader.get_avg_fps())

    def get_batch(self, indices: list[int]) -> np.ndarray:
        return self._reader.get_batch(indices).asnumpy()


class TorchcodecReader:
    """torchcodec on CPU. `seek_mode="exact"` scans the file once, as decord does, so frame
    counts and indices mean the same thing in both backends."""

    def __init__(self, source: Any, threads: int):
        from torchcodec.decoders import VideoDecoder

        if not isinstance(source, str):
            source = source.getvalue()  # BytesIO from the child -> raw bytes
        self._decoder = VideoDecoder(source, seek_mode="exact", dimension_order="NHWC",
                                     num_ffmpeg_threads=threads)
        meta = self._decoder.metadata
        self.n_frames = int(meta.num_frames or 0)
        self.fps = float(meta.average_fps or 0.0)

    def get_batch(self, indices: list[int]) -> np.ndarray:
        return self._decoder.get_frames_at(indices).data.numpy()


READERS = {"decord": DecordReader, "torchcodec": TorchcodecReader}


def import_backend(name: str) -> None:
    """Import the backend before the child says `ready` (start-up is never charged to a video)."""
    if name == "torchcodec":
        from torchcodec.decoders import VideoDecoder  # noqa: F401  (loads libtorchcodec + FFmpeg)
    else:
        import decord  # noqa: F401


def ffmpeg_library_dir() -> str | None:
    """A folder of PyAV's bundled FFmpeg under plain sonames, or None when the system has one."""
    if ctypes.util.find_library("avutil"):
        return None
    spec = importlib.util.find_spec("av")
    if spec is None or spec.origin is None:
        return None
    libs = Path(spec.origin).resolve().parent.parent / "av.libs"
    if not libs.is_dir():
        return None
    files = sorted(p for p in libs.iterdir() if ".so" in p.name)
    tag = hashlib.sha256("\n".join(str(p) for p in files).encode()).hexdigest()[:12]
    final = Path(tempfile.gettempdir()) / f"higen-ffmpeg-{tag}"
    if final.is_dir():
        return str(final)
    staging = Path(tempfile.mkdtemp(prefix="higen-ffmpeg-", dir=tempfile.gettempdir()))
    for p in files:
        # The real names too: the loader resolves their $ORIGIN-relative needs from this folder.
        os.symlink(p, staging / p.name)
        m = _MANGLED.match(p.name)
        if m:
            os.symlink(p, staging / f"{m.group(1)}.so.{m.group(2)}")
    try:
        os.rename(staging, final)  # atomic: concurrent workers either win or use the winner's
    except OSError:
        for p in staging.iterdir():
            p.unlink()
        staging.rmdir()
    return str(final)


def child_env(name: str, env: dict[str, str]) -> dict[str, str]:
    """The decoder child's environment for backend `name`."""
    if name != "torchcodec":
        return env
    found = ffmpeg_library_dir()
    if found is None:
        return env
    return dict(env, LD_LIBRARY_PATH=os.pathsep.join(filter(None, [found, env.get("LD_LIBRARY_PATH")])))


def cpu_backend(decoder: str) -> str:
    """The backend of the isolated child: nvdec probes and falls back on decord."""
    return decoder if decoder in CPU_DECODERS else "decord"


def preflight(video_cfg: Any) -> None:
    """Start one real decoder child with the configured backend; BackendUnavailable if it fails.

    Run by the driver before any shard, so a missing backend is one clear error, not a failed
    row per video.
    """
    from preprocessing.isolation import VideoDecoderProcess

    backend = cpu_backend(video_cfg.decoder)
    if backend == "torchcodec" and importlib.util.find_spec("torchcodec") is None:
        raise BackendUnavailable(
            "config field 'video.decoder': torchcodec is not installed; `pip install torchcodec` "
            "(a wheel matching your torch), or set video.decoder=decord"
        )
    proc = VideoDecoderProcess(video_cfg)
    try:
        proc.start()
    except RuntimeError as exc:
        raise BackendUnavailable(
            f"config field 'video.decoder': the {backend} decoder cannot start here ({exc}). "
            + ("torchcodec needs FFmpeg 4-8 libraries (a system FFmpeg, or PyAV's wheel) and a wheel "
               "built for this torch; " if backend == "torchcodec" else "")
            + "or set video.decoder=decord"
        ) from None
    finally:
        proc.close()
