"""The hostile corpus of the fault tests and `bench/faults.py` (issue 8): ~55 rows of broken
and odd media and captions, each with its one exact expected outcome.

An expectation is "ok" or "failed:<reason>". Nothing is "either": a row whose outcome is not
known is not a test. `write_video` encodes frames with PyAV (any codec, pixel format, irregular
timestamps) for other tests too.
"""

from __future__ import annotations

import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd


def write_video(
    path: Path, frames: np.ndarray, codec: str, pix_fmt: str, options: dict, pts_ms: list[int] | None = None
) -> None:
    """Encode RGB frames; with `pts_ms` the frames get those (irregular) timestamps."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=24)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = pix_fmt
        stream.thread_count = 1
        stream.options = options
        if pts_ms is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        for i, arr in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(arr, format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[i], Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def moving(n: int, height: int, width: int, seed: int) -> np.ndarray:
    from preprocessing.synthetic import render_clip

    return render_clip(np.random.default_rng(seed), width, height, n, 24.0, 80.0, (1, 0), 0.3)[0]


X264 = {"preset": "ultrafast", "crf": "20"}


def build_hostile_corpus(root: Path) -> dict:
    """Writes media + `videos.parquet` / `images.parquet` under `root`. Returns
    {"videos": path, "images": path, "expect": {kind: [expectation per row]}, "kinds": [...]}
    where an expectation is "ok" or "failed:<reason>"."""
    from PIL import Image

    from preprocessing.synthetic import _png_bomb, generate

    syn = generate(root / "syn", videos=2, images=7, bad=True, seconds=1.5)
    expected = syn["expected_failures"]
    kinds: list[str] = []
    videos: list[tuple[str | None, object, str]] = []  # (source, caption, expectation)
    images: list[tuple[str | None, object, str]] = []
    for row in syn["videos"]:
        reason = expected.get(row["video"])
        videos.append((row["video"], row["caption"], f"failed:{reason}" if reason else "ok"))
        kinds.append(Path(row["video"]).stem if reason else "good " + Path(row["video"]).suffix)
    for row in syn["images"]:
        reason = expected.get(row["image"])
        images.append((row["image"], row["caption"], f"failed:{reason}" if reason else "ok"))
        kinds.append(Path(row["image"]).stem.split("_", 1)[-1] if not reason else Path(row["image"]).stem)
    good_mp4 = Path(syn["videos"][0]["video"])
    good_png = Path(next(r["image"] for r in syn["images"] if r["image"].endswith("png_rgb.png")))

    odd = root / "odd"
    odd.mkdir(parents=True, exist_ok=True)

    def video(name: str, caption: object, expect: str, kind: str) -> str:
        videos.append((str(odd / name), caption, expect))
        kinds.append(kind)
        return str(odd / name)

    clip = moving(16, 64, 96, 1)
    write_video(
        odd / "tenbit.mkv",
        clip,
        "libx265",
        "yuv420p10le",
        {"preset": "ultrafast", "x265-params": "log-level=none"},
    )
    video("tenbit.mkv", "a ten bit hevc clip", "ok", "10-bit yuv420p10le hevc")
    write_video(odd / "yuv444.mp4", clip, "libx264", "yuv444p", X264)
    video("yuv444.mp4", "a 4:4:4 h264 clip", "ok", "4:4:4 h264")
    pts = [int(t) for t in np.cumsum([0, 10, 90, 15, 200, 30, 30, 120, 5, 60, 40, 300, 20, 20, 70, 45])]
    write_video(odd / "vfr.mkv", clip, "libx264", "yuv420p", X264, pts_ms=pts)
    video("vfr.mkv", "a variable frame rate clip", "ok", "variable frame rate")
    write_video(odd / "wide.mp4", moving(12, 16, 2000, 2), "libx264", "yuv420p", X264)
    video("wide.mp4", "a 2000x16 strip", "ok", "extreme aspect video 2000x16")
    # decord's get_batch refuses frames 8, 16 or 24 pixels wide ("Check failed: from_size ==
    # to_size"); the decoder child then decodes them with PyAV (issue 11).
    tiny = moving(12, 32, 32, 3)
    for side, pix_fmt in ((8, "yuv444p"), (16, "yuv420p"), (24, "yuv420p")):
        lo = (32 - side) // 2
        square = tiny[:, lo : lo + side, lo : lo + side].copy()
        write_video(odd / f"tiny{side}.mp4", square, "libx264", pix_fmt, X264)
        video(f"tiny{side}.mp4", f"a {side}x{side} clip", "ok", f"tiny {side}x{side} video")
    shutil.copy(good_mp4, odd / "really_mp4.avi")
    video("really_mp4.avi", "an mp4 named .avi", "ok", "wrong extension (mp4 as .avi)")
    noext = odd / "no_extension"
    shutil.copy(good_mp4, noext)
    video("no_extension", "an mp4 without extension", "ok", "no extension")
    data = bytearray(good_mp4.read_bytes())
    rng = np.random.default_rng(7)
    mid = len(data) // 3
    data[mid : mid + 2048] = rng.integers(0, 256, 2048, dtype=np.uint8).tobytes()
    (odd / "garbled_middle.mp4").write_bytes(bytes(data))
    # The garbage lands in the frames decord must decode: ffmpeg answers AVERROR_INVALIDDATA.
    video("garbled_middle.mp4", "random bytes mid-stream", "failed:decode_error", "garbled mid-stream")
    (odd / "a_folder.mp4").mkdir(exist_ok=True)
    video("a_folder.mp4", "a directory, not a file", "failed:missing_file", "directory as source")
    weird = odd / "we ird\tname ünï 😀 ;rm -rf.mp4"
    shutil.copy(good_mp4, weird)
    video(weird.name, "a file name with spaces, tab, unicode, shell chars", "ok", "hostile file name")
    # Captions: control characters, path separators, unicode, very long.
    for caption, kind in [
        ("a clip\x00with\x1b[31m control\x07 chars\r\n", "caption with control chars"),
        ("../../etc/passwd", "caption ../../etc/passwd"),
        ("a/b\\c", "caption a/b\\c"),
        ("ユニコード 🎬 – ïñ", "unicode caption"),
        ("", "empty caption"),
        ("word " * 20000, "100 kB caption"),
    ]:
        name = f"cap{len(kinds)}.mp4"
        shutil.copy(good_mp4, odd / name)
        expect = "failed:bad_caption" if caption.strip() == "" else "ok"
        video(name, caption, expect, kind)
    # Path-like sources: the key is a digest, so these must not reach tar member names.
    video("../odd/./cap_dup.mp4", "dotted path", "ok", "source with ../ and ./")
    shutil.copy(good_mp4, odd / "cap_dup.mp4")
    # Duplicate rows next to each other (same shard with samples_per_shard >= 2).
    video("cap_dup.mp4", "a duplicate row", "ok", "duplicate row (first)")
    video("cap_dup.mp4", "a duplicate row", "failed:duplicate", "duplicate row (second)")

    def image(name: str, caption: object, expect: str, kind: str) -> None:
        images.append((str(odd / name), caption, expect))
        kinds.append(kind)

    base = np.asarray(Image.open(good_png).convert("RGB"))
    Image.fromarray(np.resize(base, (16, 2000, 3))).save(odd / "strip.png")
    image("strip.png", "a 2000x16 strip", "ok", "extreme aspect image 2000x16")
    Image.fromarray(np.resize(base, (3000, 8, 3))).save(odd / "tower.png")
    image("tower.png", "an 8x3000 tower", "ok", "extreme aspect image 8x3000")
    Image.fromarray(base[:8, :8]).save(odd / "tiny.png")
    image("tiny.png", "an 8x8 image", "ok", "tiny 8x8 image")
    shutil.copy(good_png, odd / "png_named.jpg")
    image("png_named.jpg", "a png named .jpg", "ok", "wrong extension (png as .jpg)")
    Image.fromarray(base).convert("CMYK").save(odd / "cmyk.tiff")
    image("cmyk.tiff", "a CMYK tiff", "ok", "CMYK tiff")
    rgb16 = base.astype(np.uint16) * 257
    _png16_rgb(odd / "rgb16.png", rgb16)
    image("rgb16.png", "a 16-bit RGB png", "ok", "16-bit RGB png")
    (odd / "bomb_wide.png").write_bytes(_png_bomb(1_000_000, 200))
    image("bomb_wide.png", "a 200M pixel strip bomb", "failed:image_bomb", "decompression bomb (wide)")
    frames = [Image.fromarray(np.roll(base, 8 * i, axis=1)) for i in range(3)]
    frames[0].save(odd / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    image("anim.gif", "an animated gif", "ok", "animated gif as image")
    write_video(odd / "video_as_image.mp4", clip[:4], "libx264", "yuv420p", X264)
    image("video_as_image.mp4", "a video in the image column", "failed:bad_image", "video in image column")
    images.append((None, "no source at all", "failed:missing_file"))
    kinds.append("empty source column")

    out = {"kinds": kinds, "expect": {}}
    for kind, rows, column in (("videos", videos, "video"), ("images", images, "image")):
        frame = pd.DataFrame({column: [r[0] for r in rows], "caption": [r[1] for r in rows]})
        path = root / f"{kind}.parquet"
        frame.to_parquet(path, index=False)
        out[kind] = str(path)
        out["expect"][kind] = [r[2] for r in rows]
    return out


def _png16_rgb(path: Path, rgb16: np.ndarray) -> None:
    """16 bits per channel RGB PNG (PIL cannot write it)."""
    import struct
    import zlib

    height, width = rgb16.shape[:2]
    raw = b"".join(b"\0" + rgb16[y].astype(">u2").tobytes() for y in range(height))

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


