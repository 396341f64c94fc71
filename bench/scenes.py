"""What `video.split` costs per video: the scene scan (PySceneDetect's ContentDetector on a
low-resolution decord decode, in its isolated child) against the fixed-window split (the
container's frame count only). Prints a table.

    python bench/scenes.py [--seconds 60] [--fps 30] [--size 640x360] [--repeats 3]

Generates (once, cached under the temp folder) an h264 video with a hard cut every 5 s and a
square gliding inside each scene, then times `SceneScanner.split` (child started first; the
median of `--repeats`). Spans found are shown so a wrong detection is visible, not just slow.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from preprocessing.scenes import SceneScanner  # noqa: E402
from preprocessing.settings import VideoConfig  # noqa: E402

CUT_EVERY_S = 5


def make_video(seconds: int, fps: int, width: int, height: int) -> Path:
    import av

    path = Path(tempfile.gettempdir()) / f"higen-scenes-{seconds}s-{fps}fps-{width}x{height}.mp4"
    if path.exists():
        return path
    tmp = path.with_suffix(".part.mp4")
    with av.open(str(tmp), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast"}
        for i in range(seconds * fps):
            scene = i // (fps * CUT_EVERY_S)
            frame = np.empty((height, width, 3), np.uint8)
            frame[...] = ((37 * scene) % 256, (91 * scene + 40) % 256, (53 * scene + 90) % 256)
            x = (i * 4) % (width - 64)
            frame[height // 4 : height // 4 + 64, x : x + 64] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.rename(path)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--size", default="640x360")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.split("x"))
    video = make_video(args.seconds, args.fps, width, height)
    frames = args.seconds * args.fps
    print(f"video: {args.seconds} s, {width}x{height} at {args.fps} fps ({frames} frames), "
          f"a cut every {CUT_EVERY_S} s; timings are wall-clock on a shared machine")
    print(f"{'split':8s} {'median s':>9s} {'frames/s':>9s} {'spans':>6s}  first spans")
    for mode in ("scenes", "fixed"):
        scanner = SceneScanner(VideoConfig(split=mode, clip_seconds=CUT_EVERY_S, decode_timeout_s=120))
        try:
            split = scanner.split(str(video))  # starts the child; not timed
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                split = scanner.split(str(video))
                times.append(time.perf_counter() - start)
        finally:
            scanner.close()
        median = statistics.median(times)
        shown = ", ".join(f"[{a:g}, {b:g})" for a, b in split.spans[:3])
        print(f"{mode:8s} {median:9.3f} {frames / median:9.0f} {len(split.spans):6d}  {shown} ...")


if __name__ == "__main__":
    main()
