"""The isolated video-decoder child process, seen from the worker (parent) side.

Why a separate process: decord/ffmpeg can abort, segfault, hang or leak on hostile files.
One long-lived child per worker decodes all videos; the worker survives anything it does:

- a hang is killed after `decode_timeout_s`               -> reason `timeout`
- the child dies by a signal (abort, segfault)            -> `decoder_crash`
- it is SIGKILLed by the kernel OOM killer, or an allocation
  fails under its RLIMIT_AS of `decode_memory_mb`         -> `out_of_memory`
- it is restarted every `decoder_recycle_every` videos, so decord's leaks never accumulate.

The child is a fresh interpreter (`python -m preprocessing.video`) talking over a socketpair
with `multiprocessing.connection` framing. Unlike multiprocessing's spawn/forkserver contexts,
this never re-imports the parent's `__main__` (a Ray worker's entry script), and frames come
back as raw bytes plus a small JSON header instead of pickles.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from preprocessing.settings import VideoConfig
from preprocessing.shard_format import SampleError

_START_TIMEOUT_S = 120.0  # interpreter + decord import; not charged to any video


class VideoDecoderProcess:
    """Decodes one clip per call in the child; every failure becomes a `SampleError`."""

    def __init__(self, cfg: VideoConfig, threads: int = 0):
        self.cfg = cfg
        self.threads = threads  # decord decoding threads; 0 = ffmpeg's choice
        self.decodes_since_start = 0
        self.restarts = 0
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._stderr = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def _start(self) -> None:
        parent_sock, child_sock = socket.socketpair()
        self._stderr = tempfile.TemporaryFile()
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "preprocessing.video", str(child_sock.fileno()),
                 str(self.cfg.decode_memory_mb)],
                pass_fds=(child_sock.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=self._stderr,
                env=env,
            )
        finally:
            child_sock.close()
        self._conn = Connection(parent_sock.detach())
        if not self._conn.poll(_START_TIMEOUT_S):
            tail = self._stop(kill=True)
            raise RuntimeError(f"video decoder child did not start within {_START_TIMEOUT_S:.0f}s: {tail}")
        try:
            self._conn.recv_bytes()
        except (EOFError, OSError):
            tail = self._stop(kill=True)
            raise RuntimeError(f"video decoder child failed to start: {tail}") from None
        self.decodes_since_start = 0
        self.restarts += 1

    def _stop(self, kill: bool) -> str:
        """Stop the child; returns the tail of its stderr (ffmpeg/abort messages) for details."""
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        if conn is not None:
            if not kill:
                try:
                    conn.send_bytes(b'{"quit": true}')
                except OSError:
                    pass
            conn.close()
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

    def decode(
        self, source: str, key: str, data: bytes | None = None, *, _test_hook: str | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """uint8 [F,H,W,3] frames (cropped to W×H) and their metadata; raises SampleError."""
        if self._proc is None or self._proc.poll() is not None:
            self._stop(kill=True)
            self._start()
        cfg = self.cfg
        req = {
            "source": source, "key": key, "has_data": data is not None, "frames": cfg.frames,
            "width": cfg.width, "height": cfg.height, "target_fps": cfg.target_fps,
            "threads": self.threads, "test_hook": _test_hook,
        }
        try:
            try:
                self._conn.send_bytes(json.dumps(req).encode())
                if data is not None:
                    self._conn.send_bytes(data)
                if not self._conn.poll(cfg.decode_timeout_s):
                    self._stop(kill=True)
                    raise SampleError(
                        "timeout",
                        f"{source}: decoding took longer than {cfg.decode_timeout_s:g}s; the decoder was "
                        f"killed (raise video.decode_timeout_s if such files are legitimate)",
                    )
                header = json.loads(self._conn.recv_bytes())
                frames = None
                if header.get("ok"):
                    # Received straight into a writable array: no pickle, no extra copy.
                    frames = np.empty(header["shape"], dtype=np.uint8)
                    self._conn.recv_bytes_into(frames.reshape(-1))
            except (EOFError, OSError, ConnectionError):
                raise self._crashed(source) from None
        finally:
            self.decodes_since_start += 1
            if self._proc is not None and self.decodes_since_start >= cfg.decoder_recycle_every:
                self._stop(kill=False)
        if not header["ok"]:
            raise SampleError(header["reason"], f"{source}: {header['detail']}")
        return frames, header["meta"]

    def _crashed(self, source: str) -> SampleError:
        proc = self._proc
        code = proc.wait(timeout=10) if proc is not None else None
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
