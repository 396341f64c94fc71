"""Clip spans of manifest rows: several samples from one long video (docs: "Bring your dataset").

A manifest row names one video and, optionally, the clips to take from it:

- `manifest.start_column` / `manifest.end_column`: one clip a row (InternVid: detected from its
  `YoutubeID, Start_timestamp, End_timestamp, Caption` columns);
- `manifest.clips_column`: a list of `[start, end]` per row (Panda-70M: detected from its
  `videoID, url, timestamp, caption` columns; also items `{"span": [start, end], ...}` as
  HD-VILA ships them);
- `manifest.source_template` (`/data/internvid/{YoutubeID}.mp4`): the video's path or URL built
  from any columns of the row, instead of a video column.

Times are seconds (a number or a numeric string) or `H:MM:SS.fff` strings. Lists arrive as
real lists (parquet, JSONL) or as Python-literal strings (Panda-70M's CSV), parsed with
`ast.literal_eval`, never `eval`. `manifest.caption_column` may hold a list parallel to the
spans (one caption per clip) or one caption that every clip of the row shares.

Each clip is one sample: key `sample_key(source, span)`, frames chosen inside its span,
`clip: [start_s, end_s]` in its KEY.json, one status row with `clip_start`/`clip_end`. A row's
clips stay in its shard. What cannot be checked up front (a column missing from the first
file, a template naming a missing column) is a `ManifestError`; a row whose spans do not parse,
or whose caption list does not match its spans, fails as a whole with reason `bad_span` /
`bad_caption` naming the manifest row.

Hook for scene splitting (`video.split`): `row_clips(spans, caption, row)` turns a row's spans
into its clips; `spans=None` means the whole video, today's one sample per row. A splitter
that finds spans for a row without any (`preprocessing/scenes.py`) passes them here and gets
clips decoded exactly like manifest spans (one open per video, `bad_span`/`too_short` codes).
"""

from __future__ import annotations

import ast
import math
import os
import re
import string
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from core.shard_format import sample_key

Span = tuple[float, float]

PANDA70M = ("videoID", "url", "timestamp", "caption")
INTERNVID = ("YoutubeID", "Start_timestamp", "End_timestamp")
_TIME = re.compile(r"^(?:(\d+):)?(?:(\d+):)?(\d+(?:[.,]\d*)?)$")
_MAX_LITERAL = 1 << 20  # a span or caption list string longer than this is refused unparsed


class RowError(Exception):
    """One manifest row cannot become clips; `reason` is a status code, `detail` names the row."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Clip:
    """One sample of a row: its span in seconds (None: the whole video) and its caption."""

    span: Span | None
    caption: Any


def parse_time(value: Any) -> float:
    """Seconds from a number, a numeric string or `[H:]MM:SS[.fff]`; ValueError otherwise."""
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{value!r} is not a time")
    if isinstance(value, (int, float, np.integer, np.floating)):
        seconds = float(value)
    elif isinstance(value, str):
        m = _TIME.match(value.strip())
        if not m:
            raise ValueError(f"{value!r} is not seconds or H:MM:SS.fff")
        hours, minutes, secs = m.groups()
        if minutes is None and hours is not None:  # "MM:SS": the one colon group is minutes
            hours, minutes = None, hours
        seconds = int(hours or 0) * 3600 + int(minutes or 0) * 60 + float(secs.replace(",", "."))
    else:
        raise ValueError(f"{value!r} ({type(value).__name__}) is not a time")
    if not math.isfinite(seconds):
        raise ValueError(f"{value!r} is not a finite time")
    return seconds


def parse_list(value: Any) -> list:
    """A real list (parquet, JSONL; numpy arrays too) or a Python-literal list string (CSV)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str):
        if len(value) > _MAX_LITERAL:
            raise ValueError(f"list text of {len(value)} characters is too long")
        try:
            parsed = ast.literal_eval(value.strip())  # literals only: no names, no calls
        except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError) as exc:
            raise ValueError(f"{_short(value)} is not a list literal ({type(exc).__name__})") from None
        if isinstance(parsed, (list, tuple)):
            return list(parsed)
    raise ValueError(f"{_short(value)} is not a list")


def parse_spans(value: Any) -> list[Span]:
    """`[[start, end], ...]` (or `[{"span": [start, end]}, ...]`) -> [(start_s, end_s), ...]."""
    spans = []
    for item in parse_list(value):
        if isinstance(item, dict) and "span" in item:
            item = item["span"]
        pair = parse_list(item) if not isinstance(item, str) else None
        if pair is None or len(pair) != 2:
            raise ValueError(f"span {_short(item)} is not a [start, end] pair")
        spans.append((parse_time(pair[0]), parse_time(pair[1])))
    return spans


def row_clips(spans: list[Span] | None, caption: Any, row: int, list_captions: bool = False) -> list[Clip]:
    """The clips of one manifest row; `spans=None` is the whole video (one clip, span None).

    `caption` is one caption for every clip, or a list (or list literal string) with one per
    span; `list_captions` says the layout always ships a list (Panda-70M), so a string that
    does not parse as one is an error rather than a caption. RowError for an empty span list
    or a caption list of another length (nothing is dropped silently)."""
    if spans is None:
        return [Clip(None, caption)]
    if not spans:
        raise RowError("bad_span", f"manifest row {row}: the span list is empty (no clip to take)")
    captions = _caption_list(caption, row, list_captions)
    if captions is None:
        return [Clip(span, caption) for span in spans]
    if len(captions) != len(spans):
        raise RowError(
            "bad_caption",
            f"manifest row {row}: {len(captions)} caption(s) for {len(spans)} clip span(s); "
            "the caption list must be parallel to the spans",
        )
    return [Clip(span, text) for span, text in zip(spans, captions)]


def _caption_list(caption: Any, row: int, list_captions: bool) -> list | None:
    if isinstance(caption, (list, tuple, np.ndarray)):
        return parse_list(caption)
    if not isinstance(caption, str):
        return None
    text = caption.strip()
    looks_like_list = text.startswith(("[", "(")) and text.endswith(("]", ")"))
    if not (list_captions or looks_like_list):
        return None
    try:
        captions = parse_list(text)
    except ValueError as exc:
        if list_captions:
            raise RowError("bad_caption", f"manifest row {row}: caption list does not parse: {exc}") from None
        return None  # "[Music] a man sings": a caption that happens to start with a bracket
    if not list_captions and not all(isinstance(c, str) for c in captions):
        return None
    return captions


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def template_fields(template: str) -> list[str]:
    """The column names a `manifest.source_template` uses; ValueError for a malformed one."""
    names = []
    for _, name, spec, conversion in string.Formatter().parse(template):
        if name is None:
            continue
        if not name or name.isdigit() or any(ch in name for ch in ".[]"):
            raise ValueError(f"{{{name}}} is not a column name (write {{COLUMN}}, e.g. {{YoutubeID}})")
        if spec or conversion:
            raise ValueError(f"{{{name}}} has a format spec or conversion; write plain {{COLUMN}}")
        names.append(name)
    if not names:
        raise ValueError("names no column (write e.g. /data/videos/{YoutubeID}.mp4)")
    return list(dict.fromkeys(names))


def _text(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # an id column read as double: 123.0 -> "123"
    text = str(value).strip()
    return text or None


@dataclass(frozen=True)
class ClipSpec:
    """How one manifest names its videos and clips (from config and the first file's columns)."""

    layout: str = "plain"  # plain | start_end | clips | panda70m | internvid
    source_column: str | None = None  # overrides `manifest.video_column` (Panda-70M: url)
    caption_column: str | None = None  # overrides `manifest.caption_column` (InternVid: Caption)
    start_column: str | None = None
    end_column: str | None = None
    clips_column: str | None = None
    template: str | None = None
    fields: tuple[str, ...] = field(default=())  # the template's columns
    list_captions: bool = False  # captions are always lists (Panda-70M)

    @property
    def has_spans(self) -> bool:
        return self.clips_column is not None or self.start_column is not None

    def columns(self) -> list[str]:
        """Manifest columns the shard task needs besides source and caption (`extra_names`)."""
        names = [self.clips_column, self.start_column, self.end_column, *self.fields]
        return [n for n in dict.fromkeys(names) if n is not None]

    def source(self, values: dict[str, Any]) -> str | None:
        """The template filled from one row's column values; None when one of them is empty."""
        texts = {name: _text(values.get(name)) for name in self.fields}
        if any(t is None for t in texts.values()):
            return None
        return self.template.format_map(texts)

    def spans(self, columns: dict[str, list[Any]], i: int, row: int) -> list[Span] | None:
        """The spans of row `i` of a plan (None for a plain layout); RowError when unparsable."""
        if not self.has_spans:
            return None
        try:
            if self.clips_column is not None:
                return parse_spans(columns[self.clips_column][i])
            return [(parse_time(columns[self.start_column][i]), parse_time(columns[self.end_column][i]))]
        except ValueError as exc:
            names = self.clips_column or f"{self.start_column}/{self.end_column}"
            raise RowError("bad_span", f"manifest row {row}: column {names!r}: {exc}") from None

    def clips(self, columns: dict[str, list[Any]], i: int, row: int, caption: Any) -> list[Clip]:
        """Row `i` of a plan as clips; RowError when its spans or captions do not fit."""
        return row_clips(self.spans(columns, i, row), caption, row, self.list_captions)

    def span_columns(self) -> list[str]:
        return [n for n in (self.clips_column, self.start_column, self.end_column) if n]

    def identity_text(self, source: str, columns: dict[str, list[Any]], i: int) -> str:
        """What makes a row a repeat of an earlier one (reason `duplicate`; the dedupe pass
        hashes it): its source, and with spans its span values too (InternVid has a row per
        clip of the same video)."""
        if not self.has_spans:
            return source
        raw = [repr(columns[name][i]) for name in self.span_columns()]
        return f"{source}#{'|'.join(raw)}"

    def identity(self, source: str, columns: dict[str, list[Any]], i: int) -> str:
        """`sample_key` of `identity_text`: the source's key for a plain manifest."""
        return sample_key(self.identity_text(source, columns, i))

    def roots(self) -> tuple[str, ...]:
        """The folder a local absolute template points into: rows may read there by default."""
        if self.template is None or "://" in self.template or not os.path.isabs(self.template):
            return ()
        fixed = self.template.split("{", 1)[0]
        folder = fixed if fixed.endswith(os.sep) else os.path.dirname(fixed)
        return (os.path.realpath(folder),) if os.path.isdir(folder) else ()

    @classmethod
    def detect(cls, kind: str, cfg: Any, names: set[str], shown: str) -> ClipSpec:
        """The layout of a manifest whose first file has columns `names` (`cfg`: ManifestConfig).

        Explicit settings win; otherwise Panda-70M and InternVid are recognised by their
        columns. ManifestError names the file and the column or setting to fix."""
        from pipeline.manifest import ManifestError

        start, end, clips, template = cfg.start_column, cfg.end_column, cfg.clips_column, cfg.source_template
        if kind != "videos":
            if start or clips or template:
                raise ManifestError(
                    f"manifest {shown}: clip spans and manifest.source_template apply to videos only"
                )
            return cls()
        spec: dict[str, Any] = {}
        if clips or start:
            spec.update(layout="clips" if clips else "start_end", clips_column=clips, start_column=start,
                        end_column=end)
        elif set(PANDA70M) <= names:
            spec.update(layout="panda70m", clips_column="timestamp", list_captions=True,
                        source_column=None if cfg.video_column in names else "url")
        elif set(INTERNVID) <= names:
            spec.update(layout="internvid", start_column="Start_timestamp", end_column="End_timestamp")
            if cfg.caption_column not in names and "Caption" in names:
                spec["caption_column"] = "Caption"
            if template is None and cfg.video_column not in names:
                raise ManifestError(
                    f"manifest {shown} looks like InternVid (columns {', '.join(INTERNVID)}) but has no "
                    f"column {cfg.video_column!r}; set "
                    "manifest.source_template=/path/to/videos/{YoutubeID}.mp4 "
                    "(any column may appear in it) or manifest.video_column=NAME"
                )
        if template is not None:
            fields = template_fields(template)
            spec.update(template=template, fields=tuple(fields))
        out = cls(**spec)
        for setting, name in (("clips_column", out.clips_column), ("start_column", out.start_column),
                              ("end_column", out.end_column), *(("source_template", f) for f in out.fields)):
            if name is not None and name not in names:
                raise ManifestError(
                    f"manifest {shown} has no column {name!r} named by manifest.{setting} "
                    f"(columns: {', '.join(sorted(names))}); fix manifest.{setting}"
                )
        return out
