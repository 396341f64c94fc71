"""Sample filters (config section `filter`): size, aspect and duration of the source, motion
of the encoded clip. Every filter is off by default (0), so existing datasets keep their bytes.

A rejected sample is a failed row with its own reason code (never silently dropped):

| field | rejects | reason |
| --- | --- | --- |
| `min_short_side` | min(width, height) of the source < N pixels | `too_small` |
| `max_aspect` | max(w, h) / min(w, h) > X | `bad_aspect` |
| `min_duration_s`, `max_duration_s` | source (or clip span) duration outside the range | `bad_duration` |
| `min_motion` | mean raw motion factor of the clip < X | `static` |
| `max_motion_jump` | one frame pair's motion factor > X × the clip's median | `scene_cut` |

None of them costs a decode of its own. Size and duration act on what the decoder child
learns before decoding the clip's frames (`source_failure`, called in `preprocessing.video`);
the motion filters act on the factors the encoder computes anyway (`motion_failure`).
This module stays light (no torch): the decoder child imports it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from core.config import check

Failure = tuple[str, str]  # (reason code, detail)


@dataclass
class FilterConfig:
    min_short_side: int = 0  # pixels; 0 = off
    max_aspect: float = 0.0  # long side / short side; 0 = off
    min_duration_s: float = 0.0  # seconds; 0 = off
    max_duration_s: float = 0.0  # seconds; 0 = off
    min_motion: float = 0.0  # mean raw motion factor (resolution-dependent, SPEC §2); 0 = off
    max_motion_jump: float = 0.0  # × the clip's median motion factor; 0 = off

    def __post_init__(self) -> None:
        check(
            isinstance(self.min_short_side, int) and not isinstance(self.min_short_side, bool)
            and self.min_short_side >= 0,
            "min_short_side",
            f"must be an integer number of pixels >= 0 (0 = off), got {self.min_short_side!r}",
        )
        for name in ("max_aspect", "min_duration_s", "max_duration_s", "min_motion", "max_motion_jump"):
            value = getattr(self, name)
            check(
                isinstance(value, (int, float)) and not isinstance(value, bool)
                and math.isfinite(value) and value >= 0,
                name,
                f"must be a number >= 0 (0 = off), got {value!r}",
            )
        check(
            self.max_aspect == 0 or self.max_aspect >= 1,
            "max_aspect",
            f"is long side / short side, so it must be >= 1 (or 0 = off), got {self.max_aspect!r}",
        )
        check(
            self.max_duration_s == 0 or self.max_duration_s >= self.min_duration_s,
            "max_duration_s",
            f"must be >= filter.min_duration_s ({self.min_duration_s}) or 0 = off, "
            f"got {self.max_duration_s!r}",
        )
        check(
            self.max_motion_jump == 0 or self.max_motion_jump > 1,
            "max_motion_jump",
            f"is a multiple of the clip's median motion, so it must be > 1 (or 0 = off), "
            f"got {self.max_motion_jump!r}",
        )

    def source_request(self) -> dict[str, float] | None:
        """The size/duration limits for the decoder child's request; None when all are off."""
        limits = {k: v for k, v in asdict(self).items() if k in _SOURCE_FIELDS and v}
        return limits or None

    @property
    def motion_on(self) -> bool:
        return bool(self.min_motion or self.max_motion_jump)


_SOURCE_FIELDS = ("min_short_side", "max_aspect", "min_duration_s", "max_duration_s")


def source_failure(
    limits: dict[str, float] | None,
    width: int | None = None,
    height: int | None = None,
    duration: float | None = None,
) -> Failure | None:
    """The first size/duration filter a source fails, or None. `limits` is
    `FilterConfig.source_request()` (a plain dict: it crosses to the decoder child); an
    unknown width/height/duration passes that filter."""
    if not limits:
        return None
    if width and height:
        short, long = min(width, height), max(width, height)
        low = limits.get("min_short_side", 0)
        if low and short < low:
            return "too_small", (
                f"frame is {width}x{height}: short side {short} < filter.min_short_side={low:g}"
            )
        top = limits.get("max_aspect", 0)
        if top and long / short > top:
            return "bad_aspect", (
                f"frame is {width}x{height}: aspect {long / short:.3g} > filter.max_aspect={top:g}"
            )
    if duration is not None and math.isfinite(duration):
        low, top = limits.get("min_duration_s", 0), limits.get("max_duration_s", 0)
        if (low and duration < low) or (top and duration > top):
            return "bad_duration", (
                f"duration {duration:.3f}s is outside filter.min_duration_s={low:g} .. "
                f"filter.max_duration_s={top:g} (0 = no limit)"
            )
    return None


def duration_of(n_frames: int | None, fps: float | None) -> float | None:
    """Seconds from a frame count and rate; None when either is unknown."""
    if not n_frames or not fps or not math.isfinite(fps) or fps <= 0:
        return None
    return n_frames / fps


def motion_failure(cfg: FilterConfig, motion: np.ndarray) -> Failure | None:
    """`static` or `scene_cut` for a clip's raw motion factors [F-1], or None."""
    m = np.asarray(motion, dtype=np.float64)
    if m.size == 0:
        return None
    mean = float(m.mean())
    if cfg.min_motion and mean < cfg.min_motion:
        return "static", f"mean motion factor {mean:.4g} < filter.min_motion={cfg.min_motion:g}"
    if cfg.max_motion_jump:
        median = float(np.median(m))
        peak = int(m.argmax())
        if m[peak] > cfg.max_motion_jump * median:
            ratio = m[peak] / median if median > 0 else math.inf
            return "scene_cut", (
                f"frame pair {peak}->{peak + 1} has motion {m[peak]:.4g} = {ratio:.3g} x the clip's "
                f"median {median:.4g} > filter.max_motion_jump={cfg.max_motion_jump:g} "
                "(a cut inside the clip)"
            )
    return None


def describe(cfg: FilterConfig) -> dict[str, Any]:
    """The filters that are on (for logs and dataset.json readers)."""
    return {k: v for k, v in asdict(cfg).items() if v}
