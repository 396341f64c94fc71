"""Synthetic dataset for the demo, tests and benchmarks: real encoded videos and images with
known motion and appearance change, captions that describe them, and manifests.

    python -m preprocessing.synthetic --out DIR --videos N --images M [--bad] [--seed S]

Writes `DIR/videos/*` (h264 .mp4, mpeg4 .avi, vp9 .webm; native fps 24/30/12/29.97/60;
landscape, portrait and 4:3 sizes), `DIR/images/*` (PNG/JPEG in RGB, palette, grey, RGBA,
CMYK, 16-bit, EXIF-rotated), and manifests `DIR/videos.{parquet,csv,jsonl}` and
`DIR/images.{parquet,csv,jsonl}` with columns `video`/`image` (absolute path) and `caption`.
`DIR/truth.json` records each file's motion speed and appearance change. `--bad` adds broken
inputs (one per failure mode) and `DIR/expected_failures.json` mapping source -> reason code.
The same seed gives the same files.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import zlib
from fractions import Fraction
from pathlib import Path

import numpy as np

COLORS = {
    "red": (220, 40, 40), "green": (40, 180, 70), "blue": (40, 80, 220), "yellow": (235, 210, 50),
    "white": (240, 240, 240), "black": (20, 20, 20), "purple": (140, 60, 170), "orange": (240, 140, 30),
}
# (container extension, codec, native fps)
FORMATS = [
    ("mp4", "libx264", Fraction(24)), ("mp4", "libx264", Fraction(30)), ("avi", "mpeg4", Fraction(12)),
    ("mp4", "libx264", Fraction(30000, 1001)), ("webm", "libvpx-vp9", Fraction(25)),
    ("mp4", "libx264", Fraction(60)),
]
SIZES = [(640, 360), (320, 240), (240, 320), (480, 270), (352, 288)]
# words -> speed in pixels per second of video (the caption names the word)
SPEEDS = {"still": 0.0, "slowly": 20.0, "steadily": 80.0, "fast": 240.0}
DIRECTIONS = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}
# fraction of the way the background fades over the clip (to FADE of its brightness at 1.0)
CHANGES = (0.0, 0.35, 1.0)
FADE = 0.25  # background brightness at the end of a full change


def write_video(path: Path, frames: np.ndarray, codec: str, fps: Fraction, faststart: bool = False) -> None:
    import av

    options = {"movflags": "faststart"} if faststart else {}  # index first, as web videos have it
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.thread_count = 1  # single-threaded encoders give byte-identical files per seed
        if codec == "libx264":
            stream.options = {"preset": "ultrafast", "crf": "20"}
        elif "vpx" in codec:
            stream.options = {"deadline": "realtime", "cpu-used": "8"}
        for arr in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def render_clip(rng: np.random.Generator, width: int, height: int, n: int, fps: float,
                speed: float, direction: tuple[int, int], change: float) -> tuple[np.ndarray, dict]:
    """An object gliding over a gradient background whose light fades by `change` (1: to FADE)."""
    obj_name, bg0_name, bg1_name = rng.choice(list(COLORS), size=3, replace=False)
    # a third colour is still drawn (and unused) so that a seed keeps giving the same other draws
    obj, bg0 = (np.array(COLORS[c], np.float32) for c in (obj_name, bg0_name))
    bg1 = bg0 * FADE  # the light fades: where the look goes is known from the first frame
    side = max(8, min(width, height) // 5)
    x0, y0 = rng.uniform(0, width - side), rng.uniform(0, height - side)
    ramp = np.linspace(0.75, 1.0, width, dtype=np.float32)[None, :, None]
    out = np.empty((n, height, width, 3), np.uint8)
    for i in range(n):
        t = i / max(1, n - 1)
        bg = (1 - change * t) * bg0 + change * t * bg1
        frame = np.broadcast_to(bg * ramp, (height, width, 3)).copy()
        # positions wrap around the frame so fast objects never stop at an edge
        x = int((x0 + direction[0] * speed * i / fps) % (width - side))
        y = int((y0 + direction[1] * speed * i / fps) % (height - side))
        frame[y : y + side, x : x + side] = obj
        out[i] = frame.astype(np.uint8)
    return out, {"object": obj_name, "background": bg0_name}


def make_videos(out: Path, count: int, seconds: float, rng: np.random.Generator) -> tuple[list, dict]:
    rows, truth = [], {}
    (out / "videos").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        ext, codec, fps = FORMATS[i % len(FORMATS)]
        width, height = SIZES[i % len(SIZES)]
        speed_word = list(SPEEDS)[i % len(SPEEDS)]
        change = CHANGES[(i // len(SPEEDS)) % len(CHANGES)]
        direction = list(DIRECTIONS)[(i // 2) % len(DIRECTIONS)]
        n = max(2, round(seconds * float(fps)))
        frames, colors = render_clip(rng, width, height, n, float(fps), SPEEDS[speed_word],
                                     DIRECTIONS[direction], change)
        path = (out / "videos" / f"clip{i:04d}_{codec.replace('lib', '')}.{ext}").resolve()
        write_video(path, frames, codec, fps)
        motion = "standing still" if speed_word == "still" else f"moving {speed_word} to the {direction}"
        caption = f"a {colors['object']} square {motion} on a {colors['background']} background"
        # The caption never says how much the look changes, and says that it changes for only
        # every other block of (speed x change) clips: were the amount in the text, a model
        # would read it there and ignore the appearance guidance (γa), and a prompt without
        # such words would ask for no change whatever γa says.
        if change and (i // (len(SPEEDS) * len(CHANGES))) % 2 == 0:
            caption += ", the light fading"
        rows.append({"video": str(path), "caption": caption})
        truth[str(path)] = {"speed_px_per_s": SPEEDS[speed_word], "appearance_change": change,
                            "fps": float(fps), "size": [width, height], "codec": codec, "frames": n}
    return rows, truth


def make_images(out: Path, count: int, rng: np.random.Generator) -> list:
    from PIL import Image

    (out / "images").mkdir(parents=True, exist_ok=True)
    kinds = ["png_rgb", "jpeg_rgb", "png_palette", "png_grey", "png_rgba", "jpeg_cmyk", "png_16bit",
             "jpeg_exif_rotated"]
    rows = []
    for i in range(count):
        kind = kinds[i % len(kinds)]
        width, height = SIZES[(i + 1) % len(SIZES)]
        obj_name, bg_name = rng.choice(list(COLORS), size=2, replace=False)
        arr = np.empty((height, width, 3), np.uint8)
        arr[:] = COLORS[bg_name]
        r = min(width, height) // 4
        cy, cx = rng.integers(r, height - r), rng.integers(r, width - r)
        yy, xx = np.ogrid[:height, :width]
        arr[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = COLORS[obj_name]
        img = Image.fromarray(arr)
        ext = "png" if kind.startswith("png") else "jpg"
        path = (out / "images" / f"image{i:04d}_{kind}.{ext}").resolve()
        if kind == "png_palette":
            img.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(path)
        elif kind == "png_grey":
            img.convert("L").save(path)
        elif kind == "png_rgba":
            rgba = img.convert("RGBA")
            rgba.putalpha(200)
            rgba.save(path)
        elif kind == "jpeg_cmyk":
            img.convert("CMYK").save(path, quality=90)
        elif kind == "png_16bit":
            grey = np.asarray(img.convert("L")).astype(np.uint16) * 257
            Image.fromarray(grey).save(path)  # mode I;16
        elif kind == "jpeg_exif_rotated":
            exif = Image.Exif()
            exif[0x0112] = 6  # orientation: display rotated 90° clockwise
            img.transpose(Image.Transpose.ROTATE_90).save(path, quality=90, exif=exif)
        else:
            img.save(path, **({"quality": 90} if ext == "jpg" else {}))
        rows.append({"image": str(path), "caption": f"a {obj_name} circle on a {bg_name} background"})
    return rows


def _png_bomb(width: int, height: int) -> bytes:
    """A PNG header declaring a gigantic image: tiny file, huge decoded size."""
    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def make_bad(
    out: Path, good_video: Path, good_image: Path, rng: np.random.Generator
) -> tuple[list, list, dict]:
    """One broken input per failure mode; returns (video rows, image rows, source -> reason)."""
    import av

    bad = (out / "bad").resolve()
    bad.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str] = {}
    videos: list[dict] = []

    def add(name: str, data: bytes | None, reason: str, caption: str | None = "a broken file") -> None:
        path = bad / name
        if data is not None:
            path.write_bytes(data)
        videos.append({"video": str(path), "caption": caption})
        expected[str(path)] = reason

    mp4 = good_video.read_bytes()
    add("zero_bytes.mp4", b"", "empty_file")
    add("random_bytes.mp4", rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(), "decode_error")
    add("truncated.mp4", mp4[: len(mp4) // 2], "decode_error")  # index (moov) lost: fails on open
    # index first (web style), frames cut off: opens fine, fails while decoding
    fast = bad / "faststart_full.mp4"
    clip = render_clip(rng, 160, 120, 48, 24.0, 80.0, (1, 0), 0.0)[0]
    write_video(fast, clip, "libx264", Fraction(24), faststart=True)
    add("truncated_faststart.mp4", fast.read_bytes()[: fast.stat().st_size // 3], "decode_error")
    fast.unlink()
    add("jpeg_named.mp4", good_image.read_bytes(), "decode_error")
    add("text_named.mp4", b"this is a caption file, not a video\n" * 20, "decode_error")
    add("missing_file.mp4", None, "missing_file")
    audio = bad / "audio_only.m4a"
    with av.open(str(audio), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        tone = (np.sin(np.arange(16000) / 16000 * 2 * np.pi * 440) * 0.3).astype(np.float32)[None]
        for start in range(0, tone.shape[1], 1024):
            frame = av.AudioFrame.from_ndarray(tone[:, start : start + 1024], format="fltp", layout="mono")
            frame.sample_rate = 16000
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    videos.append({"video": str(audio), "caption": "a sine tone"})
    expected[str(audio)] = "no_video_stream"
    one = bad / "one_frame.mp4"
    write_video(one, np.full((1, 64, 64, 3), 128, np.uint8), "libx264", Fraction(24))
    videos.append({"video": str(one), "caption": "a single grey frame"})
    expected[str(one)] = "too_short"
    # Captions are checked per row: a good file with an empty / null caption fails on its own.
    add("empty_caption.mp4", mp4, "bad_caption", caption=" \t ")
    add("null_caption.mp4", mp4, "bad_caption", caption=None)

    images: list[dict] = []
    for name, data, reason in [
        ("zero_bytes.png", b"", "empty_file"),
        ("random_bytes.jpg", rng.integers(0, 256, 2048, dtype=np.uint8).tobytes(), "bad_image"),
        ("truncated.jpg", good_image.read_bytes()[:200], "bad_image"),
        ("bomb.png", _png_bomb(60_000, 60_000), "image_bomb"),
    ]:
        path = bad / name
        path.write_bytes(data)
        images.append({"image": str(path), "caption": "a broken image"})
        expected[str(path)] = reason
    return videos, images, expected


def write_manifests(out: Path, name: str, rows: list[dict]) -> None:
    import pandas as pd

    frame = pd.DataFrame(rows, columns=[name[:-1], "caption"])
    frame.to_parquet(out / f"{name}.parquet", index=False)
    frame.to_csv(out / f"{name}.csv", index=False)
    with open(out / f"{name}.jsonl", "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


def generate(out: str | os.PathLike, videos: int = 12, images: int = 8, bad: bool = False,
             seed: int = 0, seconds: float = 4.0) -> dict:
    """Write the synthetic set under `out`; returns {"videos": rows, "images": rows, ...}."""
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    video_rows, truth = make_videos(root, videos, seconds, rng)
    image_rows = make_images(root, images, rng)
    expected: dict[str, str] = {}
    if bad:
        if not video_rows or not image_rows:
            raise ValueError("--bad needs at least one good video and one good image to corrupt")
        jpeg = next((r["image"] for r in image_rows if r["image"].endswith(".jpg")), image_rows[0]["image"])
        bad_v, bad_i, expected = make_bad(root, Path(video_rows[0]["video"]), Path(jpeg), rng)
        video_rows += bad_v
        image_rows += bad_i
        (root / "expected_failures.json").write_text(json.dumps(expected, indent=1, sort_keys=True))
    write_manifests(root, "videos", video_rows)
    write_manifests(root, "images", image_rows)
    (root / "truth.json").write_text(json.dumps(truth, indent=1, sort_keys=True))
    return {"videos": video_rows, "images": image_rows, "truth": truth, "expected_failures": expected}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--videos", type=int, default=12, help="number of good videos")
    parser.add_argument("--images", type=int, default=8, help="number of good images")
    parser.add_argument("--bad", action="store_true", help="also write one broken input per failure mode")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=4.0,
                        help="video length (4 s fits 32 frames at 8 fps)")
    args = parser.parse_args(argv)
    res = generate(args.out, args.videos, args.images, args.bad, args.seed, args.seconds)
    print(f"wrote {len(res['videos'])} video rows and {len(res['images'])} image rows to {args.out} "
          f"({len(res['expected_failures'])} deliberately broken)")


if __name__ == "__main__":
    main()
