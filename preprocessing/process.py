"""Per-sample preprocessing: `Decoder` (file -> cropped uint8 pixels) and `Encoder` (pixels ->
latents, motion factors, appearance matrix, text tokens -> `SampleRecord`).

The pipeline calls them per row; every failure is a `SampleError` with a stable reason code
and a message naming the file, never an exception that kills the worker.
"""

from __future__ import annotations

import os
import re
import stat
import unicodedata
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from core.shard_format import SampleError, sample_key
from preprocessing.encode import Encoder
from preprocessing.image import allow_up_to, load_image
from preprocessing.isolation import VideoDecoderProcess
from preprocessing.settings import ImageConfig, VideoConfig

__all__ = ["Decoded", "Decoder", "Encoder", "clean_caption"]

KINDS = ("video", "image")


@dataclass
class Decoded:
    key: str
    kind: str  # "video" | "image"
    source: str
    caption: str
    # uint8 [F,H,W,3] (video) or [H,W,3] (image), resized + centre-cropped; None for a video the
    # encoder actor decodes on its GPU (video.decoder=nvdec): then `meta` holds the probed
    # frame indices and crop, and `data` the file's bytes (None: `source` is a local path).
    pixels: Any
    meta: dict[str, Any] = field(default_factory=dict)  # becomes KEY.json (plus model ids)
    data: bytes | None = None


_SPACES = re.compile(r"\s+")


def clean_caption(caption: Any, source: str) -> str:
    """Caption with control characters removed and whitespace collapsed; SampleError
    `bad_caption` when it is missing, not text, or empty after cleaning."""
    if caption is None or (isinstance(caption, float) and np.isnan(caption)):
        raise SampleError("bad_caption", f"{source}: caption is missing (null); every row needs a caption")
    if isinstance(caption, bytes):
        try:
            caption = caption.decode("utf-8")
        except UnicodeDecodeError:
            raise SampleError("bad_caption", f"{source}: caption bytes are not UTF-8") from None
    if not isinstance(caption, str):
        raise SampleError("bad_caption", f"{source}: caption must be text, got {type(caption).__name__}")
    # Cc = control characters (newlines become spaces), Cf = invisible format chars (zero-width).
    text = "".join(" " if unicodedata.category(ch) in ("Cc", "Zl", "Zp") else ch for ch in caption)
    text = "".join(ch for ch in text if unicodedata.category(ch) not in ("Cf", "Cs", "Co"))
    text = _SPACES.sub(" ", text).strip()
    if not text:
        raise SampleError("bad_caption", f"{source}: caption is empty (after removing control characters)")
    return text


def check_local(source: str) -> None:
    """`missing_file` / `empty_file` for a local path, without reading it."""
    try:
        st = os.stat(source)
    except FileNotFoundError:
        raise SampleError("missing_file", f"{source}: no such file (check the manifest path)") from None
    except OSError as exc:
        raise SampleError("missing_file", f"{source}: cannot stat: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise SampleError("missing_file", f"{source}: is not a regular file")
    if st.st_size == 0:
        raise SampleError("empty_file", f"{source}: file is empty (0 bytes)")


def read_local(source: str) -> bytes:
    """Bytes of a local file; `missing_file` / `empty_file` name the path."""
    try:
        with open(source, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise SampleError("missing_file", f"{source}: no such file (check the manifest path)") from None
    except IsADirectoryError:
        raise SampleError("missing_file", f"{source}: is a directory, not a file") from None
    except PermissionError:
        raise SampleError("missing_file", f"{source}: permission denied") from None
    if not data:
        raise SampleError("empty_file", f"{source}: file is empty (0 bytes)")
    return data


class Decoder:
    """File -> `Decoded`. Videos decode in an isolated, recycled child process."""

    def __init__(self, video: VideoConfig, image: ImageConfig, decode_threads: int = 0,
                 source_filter: dict[str, float] | None = None):
        self.video = video
        self.image = image
        self._videos = VideoDecoderProcess(video, threads=decode_threads)
        # size/duration filters (`FilterConfig.source_request()`), checked before frames decode
        self.source_filter = source_filter
        self._videos.request_extra = {"filter": source_filter} if source_filter else {}
        allow_up_to(image.max_pixels)

    def decode(self, kind: str, source: str, caption: Any, data: bytes | None = None,
               span: tuple[float, float] | None = None, keep_open: bool = False,
               path: str | None = None) -> Decoded:
        """Decode `source` (a local path, or any URI when `data` holds its bytes or `path` names
        a local file holding them: a large download kept on disk, opened by the video child).

        `span` [start_s, end_s]: one clip of a longer video (key `sample_key(source, span)`,
        frames inside the span, `clip` in its metadata). `keep_open`: the next call for the same
        source reuses this open video (pass it for every clip of a video but the last)."""
        if kind not in KINDS:
            raise ValueError(f"kind must be 'video' or 'image', got {kind!r}")
        if span is not None and kind != "video":
            raise ValueError("clip spans apply to videos only")
        text = clean_caption(caption, source)
        key = sample_key(source, span)
        if data is not None and not data:
            raise SampleError("empty_file", f"{source}: file is empty (0 bytes)")
        if path is not None and (kind == "image" or self.video.decoder == "nvdec"):
            data, path = read_local(path), None  # PIL, and the encoder actor, want the bytes
        if kind == "image":
            raw = read_local(source) if data is None else data
            pixels, meta = load_image(source, raw, self.image, self.source_filter)
            meta.update(width=self.image.width, height=self.image.height)
        else:
            if data is None:
                check_local(path or source)  # the child opens the path itself: no bytes through the pipe
            if self.video.decoder == "nvdec":  # probed here, isolated; decoded on the actor's GPU
                pixels, meta = None, self._videos.probe(source, key, data, span=span)
            else:
                pixels, meta = self._videos.decode(source, key, data, span=span, keep_open=keep_open,
                                                   path=path)
                meta["decoder"] = self._videos.backend
            meta.update(
                frames=self.video.frames, width=self.video.width, height=self.video.height,
                target_fps=self.video.target_fps,
            )
        return Decoded(key=key, kind=kind, source=source, caption=text, pixels=pixels,
                       meta={"source": source, "kind": kind, **meta},
                       data=data if pixels is None else None)

    @property
    def video_opens(self) -> int:
        """Videos opened by the decoder children so far (their own count: one per video of a
        row's clips, not one per clip)."""
        return self._videos.opens

    def close(self) -> None:
        self._videos.close()

    def __enter__(self) -> Decoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
