"""The shard task's side of clip spans (pipeline/clips.py): a row's clips and their results,
and the order videos are decoded in so that each video is opened once.

`RowClips` holds one manifest row's clips while they resolve: each clip is a writer slot
`(position, clip index)` of `RowFlow`, and the row is written (all its clips, in span order)
once every clip has a result. `decode_groups` orders the rows to decode by source, first
appearance first: rows naming the same video (InternVid has one row per clip) sit next to each
other, the video is fetched once and its clips are decoded by one open reader in the decoder
child (`keep_open`); the writer still takes rows in manifest order from its reorder buffer.
(A manifest that interleaves videos row by row therefore holds encoded clips of later rows in
that buffer until the rows before them are written: at most one shard's samples, ~0.5 MB a
clip at 32x448x256; Panda-70M has one row per video and InternVid lists a video's clips
together, so neither does.)

Rows whose spans are found while decoding (scene splitting, `video.split`) are expanded late:
`RowFlow.clips[pos] = RowClips(source, row_clips(spans, caption, row))`, then each clip is
decoded with `Decoder.decode(..., span=clip.span, keep_open=<not the last>)` and settled or
added as slot `(pos, j)`, exactly like manifest spans.
"""

from __future__ import annotations

from typing import Any

from core.shard_format import sample_key
from pipeline.clips import Clip

Result = tuple


class RowClips:
    """The clips of one manifest row and their results (None until settled)."""

    def __init__(self, source: str, clips: list[Clip], kept_keys: set[str] = frozenset(),
                 kept_failed: dict[str, Result] | None = None):
        """`kept_keys` / `kept_failed`: --retry-failed's committed ok clips and the failures its
        mode does not redo, by key."""
        self.source = source
        self.clips = clips
        self.keys = [sample_key(source, c.span) for c in clips]
        self.results: list[Result | None] = [None] * len(clips)
        first: dict[str, int] = {}
        for j, (clip, key) in enumerate(zip(clips, self.keys)):
            start, end = clip.span
            where = f"{source}: span [{start:g}, {end:g}] s"
            if key in first:
                self.results[j] = ("failed", "duplicate", f"{where} repeats clip {first[key]} of this row")
            elif start >= end:  # known without opening the video
                self.results[j] = ("failed", "bad_span", f"{where} has start >= end")
            elif key in kept_keys:  # --retry-failed: committed ok clip, copied from the old tar
                self.results[j] = ("kept", key)
            elif kept_failed and key in kept_failed:  # a failure this retry mode keeps as it is
                self.results[j] = kept_failed[key]
            first.setdefault(key, j)

    def pending(self) -> list[int]:
        return [j for j, r in enumerate(self.results) if r is None]

    def settle(self, j: int, res: Result) -> bool:
        """Record clip j's result; True once every clip of the row has one."""
        self.results[j] = res
        return self.done()

    def done(self) -> bool:
        return all(r is not None for r in self.results)

    def fields(self, j: int) -> dict[str, Any]:
        """Status columns of clip j (beside shard and row)."""
        start, end = self.clips[j].span
        return {"clip_start": float(start), "clip_end": float(end)}


def decode_groups(sources: list[str | None], settled: dict[int, Any]) -> list[tuple[str, list[int]]]:
    """(source, row positions) to decode, grouped by source in order of first appearance.

    Without repeated sources (a plain manifest: repeats are settled as `duplicate`) this is
    every unsettled row in manifest order, one group each: exactly the old decode order."""
    groups: dict[str, list[int]] = {}
    for pos, source in enumerate(sources):
        if pos not in settled and source:
            groups.setdefault(source, []).append(pos)
    return list(groups.items())
