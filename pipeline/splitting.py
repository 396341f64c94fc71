"""`video.split` in the shard task: rows without spans become clips of detected scenes or
fixed windows (preprocessing/scenes.py), decoded exactly like manifest spans (pipeline/clips.py
`row_clips`: one open per video, frames inside each span, `clip` in KEY.json).

- The scan runs once per video, after its fetch, in its own isolated child
  (`SceneScanner`); a file it cannot read fails the row (`decode_error`, `timeout`, ...).
- Every span is a clip with its own status row (`clip_start`/`clip_end`): the spans a run
  used are in the status table. Pieces shorter than `video.min_clip_s` fail `too_short`
  with their span (nothing vanishes).
- `--retry-failed` reuses the spans the committed shard recorded for a row instead of
  scanning again, so the retried shard holds exactly the clips it had.
"""

from __future__ import annotations

import math
from typing import Any

from core.shard_format import SampleError
from pipeline.clip_rows import RowClips
from pipeline.clips import RowError, row_clips
from pipeline.config import PrepConfig
from pipeline.prefetch import Spilled
from pipeline.worker_cache import WORKER_CACHE
from preprocessing.scenes import Split, split_spans

Span = tuple[float, float]


def recorded_spans(rows: list[dict[str, Any]], first_row: int) -> dict[int, list[Span]]:
    """{position in the shard: spans} from a committed status table, for rows with clips."""
    out: dict[int, list[Span]] = {}
    for r in rows:
        start, end, row = r.get("clip_start"), r.get("clip_end"), r.get("row")
        if row is None or start is None or end is None or math.isnan(start) or math.isnan(end):
            continue
        out.setdefault(int(row) - first_row, []).append((float(start), float(end)))
    return out


class RowSplitter:
    """Splits the rows of one shard task that have no spans (`video.split` scenes | fixed)."""

    def __init__(self, cfg: PrepConfig, threads: int = 1, recorded: dict[int, list[Span]] | None = None):
        self.video = cfg.video
        self.threads = threads
        self.recorded = recorded or {}

    @staticmethod
    def wanted(cfg: PrepConfig, kind: str) -> bool:
        return kind == "videos" and cfg.video.split != "none"

    def _scanner(self):
        from preprocessing.scenes import SceneScanner

        key = (repr(self.video), self.threads)
        return WORKER_CACHE.get("scene_scanner", key, lambda: SceneScanner(self.video, self.threads))

    def split(self, pos: int, source: str, data: bytes | Spilled | None) -> Split:
        """The spans of row `pos` (recorded ones on a retry); SampleError from the scan."""
        if isinstance(data, Spilled):  # a large download kept on disk: the scan child opens it
            source, data = data.path, None
        if data is None:  # the scan child opens the path itself: say plainly when it is missing
            from preprocessing.process import check_local

            check_local(source)
        if pos in self.recorded:
            v, spans = self.video, sorted(self.recorded[pos])
            return Split(spans=[s for s in spans if s[1] - s[0] >= v.min_clip_s - 1e-9],
                         short=[s for s in spans if s[1] - s[0] < v.min_clip_s - 1e-9])
        return self._scanner().split(source, data)

    def row(self, pos: int, row: int, source: str, data: bytes | Spilled | None, caption: Any,
            kept: tuple[set[str], dict[str, Any]]) -> RowClips | tuple:
        """Row `pos` as clips (short pieces already failed `too_short`), or its failure."""
        try:
            split = self.split(pos, source, data)
            spans = sorted(split.spans + split.short)
            clips = RowClips(source, row_clips(spans, caption, row), *kept)
        except SampleError as exc:
            return ("failed", exc.reason, exc.detail)
        except RowError as exc:  # nothing to split: a video without a usable frame
            reason = "too_short" if exc.reason == "bad_span" else exc.reason
            detail = f"{source}: video.split={self.video.split} found no clip ({exc.detail})"
            return ("failed", reason, detail)
        short = set(split.short)
        for j, clip in enumerate(clips.clips):
            if clip.span in short and clips.results[j] is None:
                start, end = clip.span
                clips.results[j] = ("failed", "too_short", (
                    f"{source}: span [{start:g}, {end:g}] s ({end - start:.3f} s) is shorter than "
                    f"video.min_clip_s={self.video.min_clip_s:g}"))
        return clips


def make_splitter(cfg: PrepConfig, store: Any, plan: Any, retry: bool) -> RowSplitter | None:
    """The shard task's splitter, or None when `video.split=none` (or for images). On a retry
    it knows the spans the committed shard recorded (read before the shard is un-committed)."""
    if not RowSplitter.wanted(cfg, plan.kind):
        return None
    from pipeline.writer import read_status

    recorded = recorded_spans(read_status(store, plan.kind, plan.index), plan.first_row) if retry else {}
    return RowSplitter(cfg, max(1, int(cfg.execution.cpus_per_worker)), recorded)


def split_rows(splitter: RowSplitter | None, flow: Any, clips: dict[int, RowClips], plan: Any,
               source: str, data: bytes | Spilled | None, rows: list[int],
               kept: tuple[set[str], dict[str, Any]]) -> list[int]:
    """Split the rows of `rows` (one fetched video) that have no spans; returns the rows still
    to decode (a row whose scan failed is settled here). `kept`: --retry-failed's ok keys and
    the failures it keeps, by key."""
    if splitter is None:
        return rows
    todo = []
    for pos in rows:
        if pos in clips:  # the manifest gave spans: they win
            todo.append(pos)
            continue
        got = splitter.row(pos, plan.first_row + pos, source, data, plan.captions[pos], kept)
        if isinstance(got, tuple):
            flow.fail_row(pos, got)
            continue
        clips[pos] = flow.clips[pos] = got
        if got.done():
            flow.settle(pos, ("clips",))
        else:
            todo.append(pos)
    return todo


__all__ = ["RowSplitter", "make_splitter", "recorded_spans", "split_rows", "split_spans"]
