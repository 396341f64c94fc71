"""The typed status columns of one row (`core.shards.STATUS_FIELDS` past `row`), from what the
row's processing already produced: an ok sample's `KEY.json` member (source size, frame count
and fps, and the factors the encoder computed), or a failure's `SampleError.meta` (a too-short
video still knows its size and length). Unknown values stay null.

- `width`, `height`: the source frame size (`original_size` in KEY.json), not the output size.
- `duration`: source seconds, `num_source_frames / native_fps` (videos only).
- `motion_mean`: mean raw motion factor of the clip; `appearance_factor`: γa = 1 - A[0, F-1],
  the same numbers KEY.json and the shard's `factors` statistics carry.
"""

from __future__ import annotations

import json
import math
from typing import Any

Members = list[tuple[str, bytes]]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def meta_fields(meta: dict[str, Any] | None) -> dict[str, Any]:
    """Status columns from a sample's metadata (KEY.json or `SampleError.meta`); never raises."""
    if not isinstance(meta, dict):
        return {}
    out: dict[str, Any] = {}
    size = meta.get("original_size")
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(_number(v) is not None for v in size):
        out["width"], out["height"] = int(size[0]), int(size[1])
    frames, fps = _number(meta.get("num_source_frames")), _number(meta.get("native_fps"))
    duration = _number(meta.get("duration"))
    if duration is None and frames is not None and fps:
        duration = frames / fps
    if duration is not None:
        out["duration"] = round(duration, 6)
    for name in ("motion_mean", "appearance_factor"):
        value = _number(meta.get(name))
        if value is not None:
            out[name] = value
    return out


def ok_fields(members: Members) -> dict[str, Any]:
    """Status columns of a written sample, read from its `KEY.json` member."""
    for name, data in members:
        if name.endswith(".json") and name.count(".") == 1:
            try:
                return meta_fields(json.loads(data))
            except (ValueError, UnicodeDecodeError):
                return {}
    return {}


def failed_fields(result: tuple) -> dict[str, Any]:
    """Status columns of a failed row: ("failed", reason, detail[, meta])."""
    return meta_fields(result[3]) if len(result) > 3 else {}
