"""The isolated video-decoder child process, seen from the worker (parent) side.

Why a separate process: decord/ffmpeg can abort, segfault, hang or leak on hostile files.
One long-lived child per worker decodes all videos; the worker survives anything it does:

- a hang is killed after `decode_timeout_s`               -> reason `timeout`
- the child dies by a signal (abort, segfault)            -> `decoder_crash`
- it is SIGKILLed by the kernel OOM killer, or an allocation
  fails under its RLIMIT_AS of `decode_memory_mb`         -> `out_of_memory`
- it is restarted every `decoder_recycle_every` videos, so decord's leaks never accumulate.

The child is a fresh interpreter (`python -m preprocessing.video`, or the module given as
`child_module`) talking over a socketpair
(`preprocessing.wire`: JSON header + raw bytes, never pickles). Unlike multiprocessing's
spawn/forkserver contexts, this never re-imports the parent's `__main__` (a Ray worker's entry
script). Frames arrive in chunks at source resolution (cropped to the visible box when that
saves much); the worker resizes chunk k while the child decodes chunk k+1.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

from core.shard_format import SampleError
from preprocessing import wire
from preprocessing.backends import child_env, cpu_backend
from preprocessing.settings import VideoConfig
from preprocessing.transform import resize_cover

_START_TIMEOUT_S = 120.0  # interpreter + decord import; not charged to any video


class VideoDecoderProcess:
    """Decodes one clip per call in the child; every failure becomes a `SampleError`."""

    def __init__(self, cfg: VideoConfig, threads: int = 0, backend: str | None = None,
                 child_module: str = "preprocessing.video"):
        self.cfg = cfg
        self.threads = threads  # decoding threads; 0 = ffmpeg's choice
        self.backend = backend or cpu_backend(cfg.decoder)  # decord | torchcodec
        # Run as `python -m child_module SOCKET_FD FRAMES_FD MEMORY_MB BACKEND`. A parameter so that
        # the isolation tests can start a child that really aborts or hangs (testing.faulty_decoder).
        self.child_module = child_module
        # More fields of every request: size/duration filters (`filter`, preprocessing/filters.py),
        # the splitting settings of the scene-scan child (`split`, preprocessing/scenes.py).
        self.request_extra: dict[str, Any] = {}
        self.decodes_since_start = 0
        self.starts = 0  # child processes started so far (first start, crashes, recycling)
        # Clips of one video (`decode(..., keep_open=True)`): the source the child holds open,
        # and video readers opened so far, as the children report them (summed over restarts).
        self._open_source: str | None = None
        self._opens_before = 0
        self._child_opens = 0
        self._proc: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        self._stderr = None
        self._frames: wire.SharedFrames | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def start(self) -> None:
        """Start the child now (it also starts on the first decode); RuntimeError if it cannot."""
        if self._proc is None or self._proc.poll() is not None:
            self._stop(kill=True)
            self._start()

    def _start(self) -> None:
        parent_sock, child_sock = socket.socketpair()
        self._frames = wire.SharedFrames.create()
        self._stderr = tempfile.TemporaryFile()
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        env = child_env(self.backend, env)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", self.child_module, str(child_sock.fileno()),
                 str(self._frames.fd), str(self.cfg.decode_memory_mb), self.backend],
                pass_fds=(child_sock.fileno(), self._frames.fd),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=self._stderr,
                env=env,
            )
        finally:
            child_sock.close()
        self._sock = parent_sock
        try:
            parent_sock.settimeout(_START_TIMEOUT_S)
            wire.recv_header(parent_sock)
        except (EOFError, OSError) as exc:
            tail = self._stop(kill=True)
            raise RuntimeError(
                f"video decoder child failed to start ({type(exc).__name__}; is video.decode_memory_mb="
                f"{self.cfg.decode_memory_mb} enough for Python + ffmpeg?): {tail}"
            ) from None
        self.decodes_since_start = 0
        self.starts += 1

    def _stop(self, kill: bool) -> str:
        """Stop the child; returns the tail of its stderr (ffmpeg/abort messages) for details."""
        proc, sock, frames = self._proc, self._sock, self._frames
        self._proc = self._sock = self._frames = None
        self._open_source = None
        self._opens_before, self._child_opens = self._opens_before + self._child_opens, 0
        if frames is not None:
            frames.close()
        if sock is not None:
            if not kill:
                try:
                    sock.settimeout(5)
                    wire.send(sock, {"quit": True})
                except OSError:
                    pass
            sock.close()
        if proc is not None:
            if kill:
                proc.kill()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        tail = ""
        if self._stderr is not None:
            self._stderr.seek(0)
            lines = self._stderr.read().decode("utf-8", "replace").strip().splitlines()
            tail = " | ".join(lines[-3:])[-300:]
            self._stderr.close()
            self._stderr = None
        return tail

    def close(self) -> None:
        self._stop(kill=False)

    @property
    def opens(self) -> int:
        """Video readers the decoder children have opened so far (their own count)."""
        return self._opens_before + self._child_opens

    def probe(self, source: str, key: str, data: bytes | None = None,
              span: tuple[float, float] | None = None) -> dict[str, Any]:
        """The clip's metadata (frame indices, original size, crop box) without decoding frames:
        what a GPU decoder in the encoder actor needs. The file is parsed in the child all the
        same, so hostile containers fail here, isolated."""
        _, meta = self.decode(source, key, data, span=span, _probe_only=True)
        return meta

    def decode(
        self, source: str, key: str, data: bytes | None = None, *,
        span: tuple[float, float] | None = None, keep_open: bool = False,
        path: str | None = None, _probe_only: bool = False,
    ) -> tuple[np.ndarray | None, dict[str, Any]]:
        """uint8 [F,H,W,3] frames (resized + centre-cropped to W×H) and metadata; SampleError.

        `span` [start_s, end_s]: the frames are chosen inside it (`bad_span` when it does not
        fit the video). `keep_open`: the child keeps the video open for the next call naming
        the same source, which then sends no bytes and opens nothing (clips of one video).
        `path`: a local file holding `source`'s bytes, which the child opens (messages name
        `source`)."""
        self.start()
        cfg = self.cfg
        req = {
            "source": path or source, "key": key, "frames": cfg.frames,
            "width": cfg.width, "height": cfg.height,
            "target_fps": cfg.target_fps, "threads": self.threads,
            "probe_only": _probe_only,
        }
        req.update(self.request_extra)
        if span is not None:
            req["span"] = [float(span[0]), float(span[1])]
        if keep_open:
            req["keep_open"] = True
        if self._open_source == source and not _probe_only:
            req.update(reuse=True, has_data=data is not None)
            data = None  # the child kept them with the open video
        deadline = time.monotonic() + cfg.decode_timeout_s
        try:
            try:
                frames, meta = self._exchange(req, data, deadline)
            except TimeoutError:
                self._stop(kill=True)
                raise SampleError(
                    "timeout",
                    f"{source}: decoding took longer than {cfg.decode_timeout_s:g}s; the decoder was "
                    f"killed (raise video.decode_timeout_s if such files are legitimate)",
                ) from None
            except (EOFError, OSError):
                raise self._crashed(source) from None
            except Exception as exc:  # never leave the child mid-answer: the pipe would desync
                self._stop(kill=True)
                raise SampleError("internal_error", f"{source}: {type(exc).__name__}: {exc}"[:400]) from exc
        finally:
            self.decodes_since_start += 1
            # never between two clips of one video: recycling would close it
            if (self._proc is not None and self.decodes_since_start >= cfg.decoder_recycle_every
                    and self._open_source is None):
                self._stop(kill=False)
        if isinstance(frames, SampleError):
            raise SampleError(frames.reason, f"{source}: {frames.detail}", frames.meta)
        return frames, meta

    def _recv(self, deadline: float) -> tuple[dict, int]:
        self._sock.settimeout(max(0.001, deadline - time.monotonic()))
        return wire.recv_header(self._sock)

    def _exchange(self, req: dict, data: bytes | None, deadline: float):
        """Send one request, collect and resize the chunks. A child-reported failure comes back
        as a SampleError *value* so that transport errors alone mean a dead child."""
        sock = self._sock
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        wire.send(sock, req, data)
        head, _ = self._recv(deadline)
        self._child_opens = head.get("opens", self._child_opens)
        self._open_source = head.get("open")
        if not head["ok"]:
            return SampleError(head["reason"], head["detail"], head.get("meta")), None
        if head.get("probe_only"):
            return None, head["meta"]
        n, region_h, region_w, _ = head["shape"]
        out = np.empty((n, self.cfg.height, self.cfg.width, 3), dtype=np.uint8)
        done = 0
        while done < n:
            msg, _ = self._recv(deadline)
            if not msg["ok"]:
                self._child_opens = msg.get("opens", self._child_opens)
                self._open_source = msg.get("open")
                return SampleError(msg["reason"], msg["detail"]), None
            start, k = msg["start"], msg["frames"]
            if start != done or k < 1 or done + k > n:
                raise EOFError(f"out-of-order chunk {start}+{k} (expected {done})")
            frame_bytes = region_h * region_w * 3
            chunk = self._frames.array(start * frame_bytes, (k, region_h, region_w, 3))
            out[done : done + k] = resize_cover(chunk, self.cfg.width, self.cfg.height)
            del chunk
            done += k
        return out, head["meta"]

    def _crashed(self, source: str) -> SampleError:
        proc, code = self._proc, None
        if proc is not None:
            try:
                code = proc.wait(timeout=5)
            except subprocess.TimeoutExpired:  # alive but the pipe broke: treat as a crash
                pass
        tail = self._stop(kill=True)
        where = f" ({tail})" if tail else ""
        if code == -signal.SIGKILL:
            return SampleError(
                "out_of_memory",
                f"{source}: the decoder was killed (SIGKILL, usually the kernel OOM killer){where}; "
                f"give workers more memory or lower video.decode_memory_mb",
            )
        name = signal.Signals(-code).name if code is not None and code < 0 else f"exit code {code}"
        return SampleError("decoder_crash", f"{source}: the video decoder died ({name}) on this file{where}")
