"""Video probing and decoding: the code that runs inside the isolated decoder child.

`python -m preprocessing.video FD MEMORY_MB` serves decode requests on the inherited socket
FD (see `preprocessing.isolation`). Imports stay light (numpy, PyAV, decord; no torch) so a
recycled child starts fast.

Protocol, per request: parent sends a JSON header (and the file bytes when `has_data`); the
child answers a JSON header, then the raw uint8 frames when `ok` (no pickles cross the pipe).
"""

from __future__ import annotations

import io
import json
import os
import sys
from typing import Any

import numpy as np

from preprocessing.geometry import TooShort, cover_crop, crop_array, select_frames

# ffmpeg demuxers that read single still images: a JPEG named .mp4 is not a video.
_IMAGE_FORMATS = ("image2", "_pipe", "gif", "apng", "webp")


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


def decode_clip(path: str, data: bytes | None, key: str, req: dict[str, Any]) -> tuple[np.ndarray, dict]:
    """Select the clip's frames (SPEC §2) and decode only those, scaled decode-side to cover W×H."""
    import decord

    info = probe(path, data)
    crop = cover_crop(info["width"], info["height"], req["width"], req["height"])
    try:
        reader = decord.VideoReader(
            _source(path, data), width=crop.resized_w, height=crop.resized_h, num_threads=req["threads"]
        )
        n_frames, native_fps = len(reader), float(reader.get_avg_fps())
        indices, stride = select_frames(n_frames, native_fps, req["target_fps"], req["frames"], key)
        frames = reader.get_batch(indices).asnumpy()
        del reader
    except TooShort as exc:
        raise DecodeFailure("too_short", str(exc)) from None
    except MemoryError:
        raise
    except Exception as exc:  # decord raises DECORDError / RuntimeError / AssertionError
        text = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        reason = "out_of_memory" if "alloc" in text.lower() or "memory" in text.lower() else "decode_error"
        raise DecodeFailure(reason, f"decord failed to decode: {text[:300]}") from None
    if frames.shape[1:3] != (crop.resized_h, crop.resized_w):
        frames = _resize_frames(frames, crop.resized_w, crop.resized_h)
    meta = {
        "frame_indices": indices,
        "native_fps": round(native_fps, 4),
        "stride": stride,
        "num_source_frames": n_frames,
        "codec": info["codec"],
        "container": info["container"],
        **crop.meta(),
    }
    return crop_array(frames, crop), meta


def _resize_frames(frames: np.ndarray, width: int, height: int) -> np.ndarray:
    # Only reached when decord ignores the requested size; Pillow keeps the child torch-free.
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(f).resize((width, height), Image.BICUBIC)) for f in frames])


def _run_test_hook(hook: str | None) -> None:
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
        hog = [bytearray(64 << 20) for _ in range(1 << 12)]  # 256 GiB: must hit RLIMIT_AS
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


def _answer(conn, req: dict[str, Any], data: bytes | None) -> None:
    try:
        _run_test_hook(req.get("test_hook"))
        frames, meta = decode_clip(req["source"], data, req["key"], req)
    except DecodeFailure as exc:
        conn.send_bytes(json.dumps({"ok": False, "reason": exc.reason, "detail": exc.detail}).encode())
        return
    except MemoryError:
        conn.send_bytes(json.dumps({"ok": False, "reason": "out_of_memory", "detail": "decoder ran out of "
                                    f"memory (limit {req['memory_mb']} MiB)"}).encode())
        return
    except Exception as exc:
        detail = f"unexpected {type(exc).__name__} while decoding: {exc}"[:400]
        conn.send_bytes(json.dumps({"ok": False, "reason": "decode_error", "detail": detail}).encode())
        return
    header = {"ok": True, "shape": list(frames.shape), "meta": meta}
    conn.send_bytes(json.dumps(header).encode())
    conn.send_bytes(memoryview(frames).cast("B"))


def serve(fd: int, memory_mb: int) -> None:
    from multiprocessing.connection import Connection

    _limit_memory(memory_mb)
    import av  # noqa: F401  (import before answering `ready`, so startup cost is not decode time)
    import decord  # noqa: F401

    av.logging.set_level(av.logging.PANIC)
    conn = Connection(fd)
    conn.send_bytes(b'{"ready": true}')
    while True:
        try:
            req = json.loads(conn.recv_bytes())
        except EOFError:  # parent went away
            return
        if req.get("quit"):
            return
        data = conn.recv_bytes() if req.get("has_data") else None
        req["memory_mb"] = memory_mb
        _answer(conn, req, data)


if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]))
