"""Video probing and decoding: the code that runs inside the isolated decoder child.

`python -m preprocessing.video SOCKET_FD FRAMES_FD MEMORY_MB [BACKEND]` serves decode requests on
the inherited socket (see `preprocessing.isolation`). BACKEND is `decord` (default) or `torchcodec`
(`preprocessing.backends`). Imports stay light for decord (numpy, PyAV, decord; no torch) so a
recycled child starts fast.

Protocol (`preprocessing.wire` frames), per request: the worker sends a JSON request, with the
file bytes as payload when it has no local path. The child answers a header (`ok`, shape,
metadata), then one message per chunk of frames written to the shared frame buffer
(`wire.SharedFrames`, raw uint8), or an error header (`ok: false`, reason, detail) at any
point. No pickles cross the pipe.
"""

from __future__ import annotations

import io
import os
import socket
import sys
from typing import Any

import numpy as np

from core.geometry import TooShort, cover_crop, select_frames
from preprocessing import wire
from preprocessing.backends import READERS, import_backend
from preprocessing.filters import duration_of, source_failure
from preprocessing.spans import BadSpan, span_frames

# ffmpeg demuxers that read single still images: a JPEG named .mp4 is not a video.
_IMAGE_FORMATS = ("image2", "_pipe", "gif", "apng", "webp")
CHUNK_FRAMES = 4  # frames decoded and sent per message (the worker resizes one while the next decodes)


class DecodeFailure(Exception):
    def __init__(self, reason: str, detail: str, meta: dict[str, Any] | None = None):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.meta = meta or {}  # what is known of the source (the status table's columns)


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


class _OpenVideo:
    """The reader kept between requests for the clips of one video (`keep_open`): a long video
    is opened once and seeked to each span in order, never opened once per clip. `opens`
    counts real reader constructions; every answer reports it (`isolation` sums them)."""

    def __init__(self) -> None:
        self.source: str | None = None
        self.reader: Any = None
        self.data: bytes | None = None  # the file's bytes when it came without a local path
        self.opens = 0

    def take(self, path: str) -> tuple[Any, bytes | None]:
        """(the open reader of `path`, its bytes), or (None, None): another video's is dropped."""
        if self.source == path and self.reader is not None:
            return self.reader, self.data
        self.drop()
        return None, None

    def keep(self, path: str, reader: Any, data: bytes | None) -> None:
        self.source, self.reader, self.data = path, reader, data

    def drop(self) -> tuple[None, None]:
        self.source = self.reader = self.data = None
        return None, None


_OPEN = _OpenVideo()


def open_clip(path: str, data: bytes | None, key: str, req: dict[str, Any]):
    """Open with the backend (decord unless the request names another) and select the clip's
    frames (docs/method.md#prep): (reader, indices, meta). With `span` [start_s, end_s] the
    frames are chosen inside the span only; with `keep_open` the reader stays open for the
    next request naming the same source (the next clip of this video).

    PyAV only probes when the backend fails or finds too few frames, to give the precise reason
    (no video stream, a still image); the happy path pays for one container open.
    """
    backend = req.get("decoder") or "decord"
    reader, _ = _OPEN.take(path) if req.get("reuse") else _OPEN.drop()
    if reader is None:
        if req.get("reuse") and data is None and req.get("has_data"):
            raise DecodeFailure("decode_error", "the decoder lost this video's open reader")
        try:
            reader = READERS[backend](_source(path, data), req["threads"])
        except MemoryError:
            raise
        except Exception as exc:  # decord raises DECORDError / RuntimeError / AssertionError
            probe(path, data)  # raises the precise failure when PyAV can tell
            raise _decord_failure(exc, backend) from None
        _OPEN.opens += 1
    if req.get("keep_open"):
        _OPEN.keep(path, reader, data)
    else:
        _OPEN.drop()
    n_frames, native_fps = reader.n_frames, reader.fps
    span = req.get("span")
    first, count = 0, n_frames
    if span is not None:
        try:
            first, count = span_frames(n_frames, native_fps, float(span[0]), float(span[1]))
        except BadSpan as exc:
            raise DecodeFailure("bad_span", str(exc)) from None
    try:
        indices, stride = select_frames(count, native_fps, req["target_fps"], req["frames"], key)
    except TooShort as exc:
        size = probe(path, data)  # a JPEG named .mp4 is a 1-frame "video" to decord
        known = {"original_size": [size["width"], size["height"]], "num_source_frames": n_frames,
                 "native_fps": round(native_fps, 4)}
        if span is not None:
            raise DecodeFailure("too_short", f"span [{span[0]:g}, {span[1]:g}] s {exc}", known) from None
        raise DecodeFailure("too_short", str(exc), known) from None
    indices = [first + i for i in indices]
    meta = {"frame_indices": indices, "native_fps": round(native_fps, 4), "stride": stride,
            "num_source_frames": n_frames}
    if span is not None:
        meta["clip"] = [float(span[0]), float(span[1])]
    return reader, indices, meta


def _decord_failure(exc: Exception, backend: str = "decord") -> DecodeFailure:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = f"{type(exc).__name__}: {first}"[:300]
    if "alloc" in text.lower() or "memory" in text.lower():
        return DecodeFailure("out_of_memory", f"{backend} ran out of memory: {text}")
    hint = " (the file is truncated or corrupt)" if "av_read_frame" in text or "1094995529" in text else ""
    return DecodeFailure("decode_error", f"{backend} failed to decode{hint}: {text}")


def send_region(crop) -> tuple[int, int, int, int]:
    """Which part of each frame the child sends: the crop box when it saves a lot, else the
    whole frame (the worker then resizes to cover and crops in its output copy, which is
    cheaper than a copy here plus a strided resize there)."""
    if crop.box_w * crop.box_h < 0.8 * crop.src_w * crop.src_h:
        return crop.box
    return 0, 0, crop.src_w, crop.src_h


def decode_chunks(reader, indices: list[int], path: str, data: bytes | None, backend: str = "decord"):
    """Yield uint8 [k, h, w, 3] chunks of the selected frames at source resolution.

    Chunks bound the child's memory (a 4K clip is 800 MB at once) and let the worker resize
    chunk k while the child decodes chunk k+1. Where decord cannot copy out a frame size (see
    `_decord_size_bug`) the rest of the clip is decoded with PyAV: the same frames, still here.
    """
    for i in range(0, len(indices), CHUNK_FRAMES):
        try:
            chunk = reader.get_batch(indices[i : i + CHUNK_FRAMES])
        except MemoryError:
            raise
        except Exception as exc:
            if backend != "decord" or not _decord_size_bug(exc):
                raise _decord_failure(exc, backend) from None
            yield from pyav_chunks(path, data, indices[i:])
            return
        yield chunk


def _decord_size_bug(exc: Exception) -> bool:
    """decord 0.6 pads each RGB row of narrow frames (widths 8, 12, 16, 24, 48, 72 among others)
    to a 32-byte multiple and then refuses its own copy: `Check failed: from_size == to_size`.
    The file is fine; only this copy fails."""
    return "from_size == to_size" in str(exc)


def pyav_chunks(path: str, data: bytes | None, indices: list[int]):
    """The frames at `indices` (ascending decode-order positions, as decord counts them) decoded
    with PyAV, in chunks of CHUNK_FRAMES. Decodes every frame up to the last index, which is
    how decord counts positions too (PyAV seeks by timestamp); cheap at these frame widths, and
    `video.decode_timeout_s` still bounds it."""
    import av

    wanted, chunk = iter(indices), []
    target = next(wanted, None)
    try:
        with av.open(_source(path, data), mode="r", metadata_errors="ignore") as container:
            for position, frame in enumerate(container.decode(video=0)):
                if position != target:
                    continue
                chunk.append(frame.to_ndarray(format="rgb24"))
                target = next(wanted, None)
                if len(chunk) == CHUNK_FRAMES or target is None:
                    yield np.stack(chunk)
                    chunk = []
                if target is None:
                    return
    except MemoryError:
        raise
    except Exception as exc:  # PyAV raises many error types for broken input
        detail = f"PyAV failed to decode: {type(exc).__name__}: {exc}"[:300]
        raise DecodeFailure("decode_error", detail) from None
    raise DecodeFailure("decode_error", f"the stream ends before frame {target} (PyAV decode)")


def _limit_memory(memory_mb: int, baseline: int = 0) -> None:
    """RLIMIT_AS of `memory_mb` MiB, plus `baseline` bytes already mapped (torchcodec's torch)."""
    import ctypes
    import resource

    # glibc reserves a 64 MiB arena per decoding thread; a few arenas keep address space small.
    # Freed frame buffers (a 4K RGB frame is 25 MB) stay mapped for reuse: with glibc's
    # defaults each chunk's buffers were fresh mmaps and trimmed heap tops, and the page faults
    # cost ~7 ms of system time per 32-frame 640x360 clip (a third of the decode itself).
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-8, 4)  # M_ARENA_MAX
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD (glibc maximum on 64-bit)
        libc.mallopt(-1, 128 << 20)  # M_TRIM_THRESHOLD
    except OSError:
        pass
    limit = (memory_mb << 20) + baseline
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard if hard != resource.RLIM_INFINITY else limit))


def _filter(limits: dict[str, float] | None, width: int | None = None, height: int | None = None,
            duration: float | None = None) -> None:
    """`filter.*` size/duration limits (preprocessing/filters.py) as a DecodeFailure."""
    failure = source_failure(limits, width, height, duration)
    if failure is not None:
        raise DecodeFailure(*failure)


def _answer(sock, frames_out: wire.SharedFrames, req: dict[str, Any], data: bytes | None) -> None:
    if req.get("reuse") and data is None and _OPEN.source == req["source"]:
        data = _OPEN.data  # the next clip of a video sent as bytes: they came with the first
    try:
        reader, indices, meta = open_clip(req["source"], data, req["key"], req)
        limits = req.get("filter")
        # a clip's duration is its span's; a video without spans is all one clip
        span = meta.get("clip")
        whole = duration_of(meta["num_source_frames"], meta["native_fps"])
        _filter(limits, duration=whole if span is None else span[1] - span[0])
        if req.get("probe_only"):  # a GPU decoder in the encoder actor decodes these frames
            size = probe(req["source"], data)
            _filter(limits, size["width"], size["height"])
            crop = cover_crop(size["width"], size["height"], req["width"], req["height"])
            shape = [len(indices), crop.src_h, crop.src_w, 3]
            wire.send(sock, _head({"ok": True, "shape": shape, "probe_only": True,
                                   "meta": {**meta, **crop.meta(), "codec": size["codec"]}}))
            return
        crop, done = None, 0
        for chunk in decode_chunks(reader, indices, req["source"], data, req.get("decoder") or "decord"):
            if crop is None:  # frame size from the first decoded chunk: no separate probe
                _filter(limits, chunk.shape[2], chunk.shape[1])  # before the other chunks decode
                crop = cover_crop(chunk.shape[2], chunk.shape[1], req["width"], req["height"])
                x0, y0, x1, y1 = send_region(crop)
                shape = (len(indices), y1 - y0, x1 - x0, 3)
                clip = frames_out.array(0, shape, grow=True)
                wire.send(sock, _head({"ok": True, "shape": list(shape), "meta": {**meta, **crop.meta()}}))
            elif chunk.shape[1:3] != (crop.src_h, crop.src_w):
                raise DecodeFailure("decode_error", "frame size changes mid-stream")
            clip[done : done + len(chunk)] = chunk[:, y0:y1, x0:x1]  # crop and share in one copy
            wire.send(sock, {"ok": True, "start": done, "frames": len(chunk)})
            done += len(chunk)
        del reader
    except DecodeFailure as exc:
        if exc.reason not in _READER_STILL_GOOD:
            _OPEN.drop()
        wire.send(sock, _head({"ok": False, "reason": exc.reason, "detail": exc.detail, "meta": exc.meta}))
    except MemoryError:
        _OPEN.drop()
        detail = f"decoder ran out of memory (limit video.decode_memory_mb={req['memory_mb']})"
        wire.send(sock, _head({"ok": False, "reason": "out_of_memory", "detail": detail}))
    except Exception as exc:
        _OPEN.drop()
        detail = f"unexpected {type(exc).__name__} while decoding: {exc}"[:400]
        wire.send(sock, _head({"ok": False, "reason": "decode_error", "detail": detail}))


# Failures that say nothing about the reader: the next clip of the video may use it.
_READER_STILL_GOOD = ("bad_span", "too_short", "too_small", "bad_aspect", "bad_duration")


def _head(msg: dict[str, Any]) -> dict[str, Any]:
    """An answer's header, with the reader opens so far and whether a video stays open."""
    return {**msg, "opens": _OPEN.opens, "open": _OPEN.source}


def _mapped_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def serve(fd: int, frames_fd: int, memory_mb: int, backend: str = "decord") -> None:
    import signal

    # Ctrl-C is the worker's to handle; it stops the child by closing the socket.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if backend == "decord":
        _limit_memory(memory_mb)
    import av  # imported before `ready`, so start-up cost is never charged to a video's timeout

    import_backend(backend)
    if backend != "decord":  # torch maps ~3 GB of address space on import: count from there
        _limit_memory(memory_mb, _mapped_bytes())

    av.logging.set_level(av.logging.PANIC)
    sock = socket.socket(fileno=fd)
    frames_out = wire.SharedFrames(frames_fd)
    wire.send(sock, {"ready": True})
    while (request := wire.recv_request(sock)) is not None:  # None: the parent left or said quit
        req, data = request
        req["memory_mb"] = memory_mb
        req["decoder"] = backend
        _answer(sock, frames_out, req, data)


if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:5])
