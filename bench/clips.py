"""Clips of a long video: one open per video against one open per clip (issue 14). Prints a table.

    python bench/clips.py [--minutes 10] [--clips 10] [--repeats 3] [--threads 1] [--keyint 250]
                          [--video PATH]

Generates (once, cached under the temp folder) a 640x360 h264 video of `--minutes` at 30 fps
with a keyframe every `--keyint` frames (250: x264's default), made of flat frames so that
generation is cheap (testing/long_video.py). A clip's decode starts at the keyframe before its
span, so the keyframe interval sets the decode cost that the open is compared with.
Takes `--clips` spans of 5 s spread over the video and decodes each at the paper size
(32 frames at 8 fps, 448x256) through the isolated decoder child, two ways:

- one open: `keep_open` for every clip but the last, so the child opens the video once and
  seeks to each span in order (what the shard task does for a video's clips);
- per-clip open: every clip is a fresh request that opens the video again (video2dataset-style
  clipping without re-encoding, or a manifest expanded into one row per clip).

The child is started before timing; the two modes alternate, `--repeats` times each, and the
median is shown. Opens are the decoder child's own count.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.shard_format import sample_key  # noqa: E402
from preprocessing.isolation import VideoDecoderProcess  # noqa: E402
from preprocessing.settings import VideoConfig  # noqa: E402
from testing.long_video import frame_number, write_long_video  # noqa: E402


def long_video(minutes: float, keyint: int) -> Path:
    path = Path(tempfile.gettempdir()) / f"higen-bench-clips-{minutes:g}min-640x360-g{keyint}.mp4"
    if not path.exists():
        t = time.perf_counter()
        tmp = path.with_suffix(".part.mp4")
        write_long_video(tmp, minutes * 60, fps=30, size=(640, 360), keyint=keyint)
        tmp.rename(path)
        print(f"generated {path} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    return path


def run(proc: VideoDecoderProcess, path: str, spans: list[tuple[float, float]],
        one_open: bool) -> tuple[float, int]:
    opens = proc.opens
    t = time.perf_counter()
    for j, span in enumerate(spans):
        frames, meta = proc.decode(path, sample_key(path, span), span=span,
                                   keep_open=one_open and j < len(spans) - 1)
        got = [frame_number(f) for f in frames]  # the pixels are the span's frames (microseconds)
        if got != [i % 4096 for i in meta["frame_indices"]]:
            raise SystemExit(f"span {span}: decoded frames {got[:4]} are not {meta['frame_indices'][:4]}")
    return time.perf_counter() - t, proc.opens - opens


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--clips", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="decoder threads (0 = ffmpeg's choice)")
    p.add_argument("--keyint", type=int, default=250, help="frames between keyframes")
    p.add_argument("--video", help="use this video instead of generating one")
    args = p.parse_args(argv)
    path = str(args.video or long_video(args.minutes, args.keyint))
    seconds = args.minutes * 60
    step = (seconds - 10) / args.clips
    spans = [(round(5 + k * step, 3), round(5 + k * step + 5, 3)) for k in range(args.clips)]
    proc = VideoDecoderProcess(VideoConfig(decoder_recycle_every=10**6), threads=args.threads)
    proc.start()
    try:
        run(proc, path, spans[:1], True)  # warm the page cache and the child's imports
        times: dict[bool, list[float]] = {True: [], False: []}
        opens: dict[bool, int] = {}
        for _ in range(args.repeats):
            for one_open in (True, False):
                s, n = run(proc, path, spans, one_open)
                times[one_open].append(s)
                opens[one_open] = n
    finally:
        proc.close()
    print(f"{args.clips} clips of 32 frames (8 fps, 448x256) from a {args.minutes:g}-minute 640x360 "
          f"h264 video (keyframe every {args.keyint} frames), median of {args.repeats}, "
          f"{args.threads} decoder thread(s)")
    print(f"{'mode':<16} {'opens':>6} {'seconds':>9} {'clips/s':>9}")
    for one_open, name in ((True, "one open"), (False, "per-clip open")):
        med = statistics.median(times[one_open])
        print(f"{name:<16} {opens[one_open]:>6} {med:>9.3f} {args.clips / med:>9.2f}")
    ratio = statistics.median(times[False]) / statistics.median(times[True])
    print(f"per-clip / one open: {ratio:.2f}x the time")


if __name__ == "__main__":
    main()
