"""The isolated child that scans whole videos for `video.split` (preprocessing/scenes.py).

`python -m preprocessing.scene_child SOCKET_FD FRAMES_FD MEMORY_MB [BACKEND]`, started by a
`preprocessing.isolation.VideoDecoderProcess` with `child_module` set to this module, so a
hostile file gets the same guards as a clip decode (timeout, RLIMIT_AS, crash -> a failed
row). It speaks the decoder child's protocol and answers every request the way a probe is
answered: one header `{"ok": true, "probe_only": true, "meta": {num_source_frames,
native_fps, cuts}}` or an error header. No frames cross the pipe.
"""

from __future__ import annotations

import io
import socket
import sys
from typing import Any

from preprocessing import wire
from preprocessing.scenes import detect_cuts, lowres_frames
from preprocessing.video import DecodeFailure, _decord_failure, _limit_memory, probe


def scan(source: str, data: bytes | None, split: dict[str, Any], threads: int) -> dict[str, Any]:
    """Frame count, fps and (for `scenes`) the frames where a scene starts."""
    import decord

    media = io.BytesIO(data) if data is not None else source
    try:
        if split["mode"] == "scenes":
            frames, n, fps = lowres_frames(media, threads)
            cuts = detect_cuts(frames, fps, float(split["threshold"]))
        else:
            reader = decord.VideoReader(media, num_threads=threads)
            n, fps, cuts = len(reader), float(reader.get_avg_fps()), []
    except MemoryError:
        raise
    except Exception as exc:  # decord's errors: ask PyAV for the precise reason first
        probe(source, data)
        raise _decord_failure(exc) from None
    return {"num_source_frames": n, "native_fps": round(fps, 4), "cuts": cuts}


def _answer(sock: socket.socket, req: dict[str, Any], data: bytes | None, memory_mb: int) -> None:
    try:
        meta = scan(req["source"], data, req["split"], int(req.get("threads") or 1))
        wire.send(sock, {"ok": True, "probe_only": True, "meta": meta})
    except DecodeFailure as exc:
        wire.send(sock, {"ok": False, "reason": exc.reason, "detail": exc.detail})
    except MemoryError:
        detail = f"scene scan ran out of memory (limit video.decode_memory_mb={memory_mb})"
        wire.send(sock, {"ok": False, "reason": "out_of_memory", "detail": detail})
    except Exception as exc:
        detail = f"unexpected {type(exc).__name__} while scanning for scenes: {exc}"[:400]
        wire.send(sock, {"ok": False, "reason": "decode_error", "detail": detail})


def serve(fd: int, frames_fd: int, memory_mb: int, backend: str = "decord") -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the worker stops us by closing the socket
    _limit_memory(memory_mb)
    import av
    import decord  # noqa: F401  (imported before `ready`: start-up is never charged to a video)
    import scenedetect  # noqa: F401

    av.logging.set_level(av.logging.PANIC)
    sock = socket.socket(fileno=fd)
    wire.send(sock, {"ready": True})
    while (request := wire.recv_request(sock)) is not None:
        req, data = request
        _answer(sock, req, data, memory_mb)


if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:5])
