"""Video probing and decoding: the code that runs inside the isolated decoder child.

`python -m preprocessing.video FD MEMORY_MB` serves decode requests on the inherited socket
FD (see `preprocessing.isolation`). Imports stay light (numpy, PyAV, decord; no torch) so a
recycled child starts fast.

Protocol (`preprocessing.wire` frames), per request: the worker sends a JSON request, with the
file bytes as payload when it has no local path. The child answers a header (`ok`, shape,
metadata), then one message per chunk of frames with the raw uint8 pixels as payload, or an
error header (`ok: false`, reason, detail) at any point. No pickles cross the pipe.
"""

from __future__ import annotations

import io
import os
import socket
import sys
from typing import Any

import numpy as np

from preprocessing import wire
from preprocessing.geometry import TooShort, cover_crop, select_frames

# ffmpeg demuxers that read single still images: a JPEG named .mp4 is not a video.
_IMAGE_FORMATS = ("image2", "_pipe", "gif", "apng", "webp")
CHUNK_FRAMES = 4  # frames decoded and sent per message (the worker resizes one while the next decodes)


class DecodeFailure(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _source(path: str, data: bytes | None):
    return io.BytesIO(data) if data is not None else path


def probe(path: str, data: bytes | None) -> dict[str, Any]:
    """Container facts from the header (PyAV): coded size, codec, format. Decodes nothing."""
    import av

    try:
        with av.open(_source(path, data), mode="r", metadata_errors="ignore") as container:
            fmt = container.format.name
            streams = container.streams.video
            if not streams:
                kinds = sorted({s.type for s in container.streams}) or ["none"]
                raise DecodeFailure("no_video_stream", f"has no video stream (streams: {', '.join(kinds)})")
            if any(tag in fmt for tag in _IMAGE_FORMATS):
                raise DecodeFailure("decode_error", f"is a still image (container {fmt}), not a video")
            ctx = streams[0].codec_context
            if not ctx.width or not ctx.height:
                raise DecodeFailure("decode_error", f"video stream has no frame size (container {fmt})")
            return {"width": int(ctx.width), "height": int(ctx.height), "codec": ctx.name, "container": fmt}
    except DecodeFailure:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # PyAV raises many error types for broken input
        detail = f"cannot be opened as a video: {type(exc).__name__}: {exc}"
        raise DecodeFailure("decode_error", detail) from None


def open_clip(path: str, data: bytes | None, key: str, req: dict[str, Any]):
    """Probe, open with decord, select the clip's frames (SPEC §2).

    Returns (reader, indices, crop, meta). Frames are decoded at source resolution: decord's
    decode-side scaling runs swscale on every decoded frame, skipped ones included, which
    measured 2× slower than scaling only the selected frames in the worker.
    """
    import decord

    info = probe(path, data)
    crop = cover_crop(info["width"], info["height"], req["width"], req["height"])
    try:
        reader = decord.VideoReader(_source(path, data), num_threads=req["threads"])
        n_frames, native_fps = len(reader), float(reader.get_avg_fps())
        indices, stride = select_frames(n_frames, native_fps, req["target_fps"], req["frames"], key)
    except TooShort as exc:
        raise DecodeFailure("too_short", str(exc)) from None
    except MemoryError:
        raise
    except Exception as exc:  # decord raises DECORDError / RuntimeError / AssertionError
        raise _decord_failure(exc) from None
    meta = {
        "frame_indices": indices,
        "native_fps": round(native_fps, 4),
        "stride": stride,
        "num_source_frames": n_frames,
        "codec": info["codec"],
        "container": info["container"],
        **crop.meta(),
    }
    return reader, indices, crop, meta


def _decord_failure(exc: Exception) -> DecodeFailure:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = f"{type(exc).__name__}: {first}"[:300]
    reason = "out_of_memory" if "alloc" in text.lower() or "memory" in text.lower() else "decode_error"
    return DecodeFailure(reason, f"decord failed to decode: {text}")


def decode_chunks(reader, indices: list[int], crop):
    """Yield uint8 [k, box_h, box_w, 3] chunks of the selected frames, cropped to the source box.

    Chunks bound the child's memory (a 4K clip is 800 MB at once) and let the worker resize
    chunk k while the child decodes chunk k+1.
    """
    x0, y0, x1, y1 = crop.box
    for i in range(0, len(indices), CHUNK_FRAMES):
        try:
            frames = reader.get_batch(indices[i : i + CHUNK_FRAMES]).asnumpy()
        except MemoryError:
            raise
        except Exception as exc:
            raise _decord_failure(exc) from None
        if frames.shape[1:3] != (crop.src_h, crop.src_w):
            got = f"{frames.shape[2]}x{frames.shape[1]}"
            raise DecodeFailure("decode_error", f"decord returned {got} frames, the container header "
                                f"says {crop.src_w}x{crop.src_h}")
        yield np.ascontiguousarray(frames[:, y0:y1, x0:x1])


def _run_test_hook(hook: str | None, memory_mb: int) -> None:
    """Misbehaviours the isolation tests inject into the real child process."""
    if hook == "abort":
        os.abort()
    elif hook == "segfault":
        import ctypes

        ctypes.string_at(0)
    elif hook == "hang":
        import time

        time.sleep(10**6)
    elif hook == "eat_memory":
        # One block as large as the whole limit: only RLIMIT_AS can refuse it (untouched pages).
        hog = np.empty(memory_mb << 20, dtype=np.uint8)
        del hog
    elif hook == "raise":
        raise RuntimeError("test hook raised")


def _limit_memory(memory_mb: int) -> None:
    import ctypes
    import resource

    # glibc reserves a 64 MiB arena per decoding thread; two arenas keep address space small.
    try:
        ctypes.CDLL("libc.so.6").mallopt(-8, 2)  # M_ARENA_MAX
    except OSError:
        pass
    limit = memory_mb << 20
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard if hard != resource.RLIM_INFINITY else limit))


def _answer(sock, req: dict[str, Any], data: bytes | None) -> None:
    try:
        _run_test_hook(req.get("test_hook"), req["memory_mb"])
        reader, indices, crop, meta = open_clip(req["source"], data, req["key"], req)
        shape = [len(indices), crop.box_h, crop.box_w, 3]
        wire.send(sock, {"ok": True, "shape": shape, "meta": meta})
        for chunk in decode_chunks(reader, indices, crop):
            wire.send(sock, {"ok": True, "frames": len(chunk)}, chunk)
        del reader
    except DecodeFailure as exc:
        wire.send(sock, {"ok": False, "reason": exc.reason, "detail": exc.detail})
    except MemoryError:
        detail = f"decoder ran out of memory (limit video.decode_memory_mb={req['memory_mb']})"
        wire.send(sock, {"ok": False, "reason": "out_of_memory", "detail": detail})
    except Exception as exc:
        detail = f"unexpected {type(exc).__name__} while decoding: {exc}"[:400]
        wire.send(sock, {"ok": False, "reason": "decode_error", "detail": detail})


def serve(fd: int, memory_mb: int) -> None:
    import signal

    # Ctrl-C is the worker's to handle; it stops the child by closing the socket.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _limit_memory(memory_mb)
    import av  # imported before `ready`, so start-up cost is never charged to a video's timeout
    import decord  # noqa: F401

    av.logging.set_level(av.logging.PANIC)
    sock = socket.socket(fileno=fd)
    wire.send(sock, {"ready": True})
    while True:
        try:
            req, n_data = wire.recv_header(sock)
        except (EOFError, OSError):  # parent went away
            return
        if req.get("quit"):
            return
        data = None
        if n_data:
            data = bytearray(n_data)
            wire.recv_payload(sock, data)
            data = bytes(data)
        req["memory_mb"] = memory_mb
        _answer(sock, req, data)


if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]))
