"""The data statistics of `dataset.json` (core/statistics.py): per-clip factors are collected
as each shard is written (into its `NNNNNN.json`, key `factors`), and finalize merges them
into percentiles. Nothing is re-read from the tars: finalize costs one small JSON per shard.

Each video shard's `factors`: `motion_mean` (the clip's mean raw motion factor),
`appearance_change` (1 - A[0, F-1]), one value per clip in tar order, `latent_shape`
([F, C, h, w] of its clips) and `skipped` (clips whose factors were unreadable or not finite:
they stay in the shard, only out of the statistics). About 20 bytes of JSON per clip.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from core.statistics import MOTION_UNITS, PERCENTILES, DataStatistics


def _npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def _npy_shape(data: bytes) -> tuple[int, ...]:
    fh = io.BytesIO(data)
    version = np.lib.format.read_magic(fh)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, _ = read(fh)  # the header only, not the payload
    return tuple(int(s) for s in shape)


class FactorLog:
    """One shard's per-clip factors, fed with each written sample's members."""

    def __init__(self) -> None:
        self.motion_mean: list[float] = []
        self.appearance_change: list[float] = []
        self.latent_shape: list[int] | None = None
        self.skipped = 0  # clips whose factors could not enter the statistics (the clip is kept)

    def add(self, members: list[tuple[str, bytes]]) -> None:
        """Never raises: statistics must not cost a shard its commit."""
        by_ext = {name.split(".", 1)[1]: data for name, data in members if "." in name}
        if "motion.npy" not in by_ext or "appearance.npy" not in by_ext:
            return  # images carry no factors
        try:
            motion, appearance = _npy(by_ext["motion.npy"]), _npy(by_ext["appearance.npy"])
            ok = motion.size > 0 and appearance.ndim == 2 and appearance.size > 0
            ok = ok and bool(np.isfinite(motion).all() and np.isfinite(appearance[0, -1]))
        except (ValueError, OSError):
            ok = False
        if not ok:
            self.skipped += 1
            return
        self.motion_mean.append(round(float(motion.mean()), 7))
        self.appearance_change.append(round(float(1.0 - appearance[0, -1]), 7))
        if self.latent_shape is None and "latents.npy" in by_ext:
            self.latent_shape = list(_npy_shape(by_ext["latents.npy"]))

    def to_dict(self) -> dict[str, Any] | None:
        if not self.motion_mean and not self.skipped:
            return None
        return {"motion_mean": self.motion_mean, "appearance_change": self.appearance_change,
                "latent_shape": self.latent_shape, "skipped": self.skipped}


# Up to this many clips the percentiles are exact (two float32 arrays: 32 MB); past it the
# driver keeps fixed-bin histograms instead, so finalize holds O(bins), not O(clips), for a
# 70M-clip dataset. Both are order-independent: the same shards give the same statistics.
EXACT_CLIPS = 1 << 22
MOTION_EDGES = np.geomspace(1e-7, 1e5, 8193)  # raw motion factor, log bins: 0.34% wide
CHANGE_EDGES = np.linspace(-1.0, 2.0, 8193)  # 1 - cosine similarity: 3.7e-4 wide


def _hist_percentiles(counts: np.ndarray, edges: np.ndarray, scale: float = 1.0) -> dict[str, float]:
    """np.percentile's linear rule on binned values: each bin's values taken at its centre."""
    centres = (edges[:-1] + edges[1:]) / 2
    cum = np.cumsum(counts)
    n = int(cum[-1])
    out = {}
    for p in PERCENTILES:
        pos = p / 100 * (n - 1)  # 0-based rank, as np.percentile's default
        lo, hi = int(np.floor(pos)), int(np.ceil(pos))
        v_lo, v_hi = centres[np.searchsorted(cum, lo + 1)], centres[np.searchsorted(cum, hi + 1)]
        out[f"p{p}"] = float(scale * (v_lo + (pos - lo) * (v_hi - v_lo)))
    return out


class FactorStats:
    """Every committed video shard's `factors`, merged one shard at a time (`add`), then
    `result()`: the driver keeps per-clip values only up to `exact_clips`, then histograms."""

    def __init__(self, exact_clips: int = EXACT_CLIPS):
        self.exact_clips = exact_clips
        self.motion: list[np.ndarray] = []
        self.change: list[np.ndarray] = []
        self.clips = 0
        self.hist: tuple[np.ndarray, np.ndarray] | None = None
        self.shapes: set[tuple[int, ...]] = set()
        self.older: list[str] = []  # ok shards from a prep without per-clip factors
        self.with_factors = 0

    def add(self, stats: dict[str, Any]) -> None:
        """Merge one shard's stats json; its `factors` lists may be dropped afterwards."""
        if not stats.get("ok"):
            return
        factors = stats.get("factors")
        if not factors:
            if "factors" not in stats:
                self.older.append(stats["shard"])
            return
        self.with_factors += 1
        if not factors["motion_mean"]:
            return
        if factors.get("latent_shape"):
            self.shapes.add(tuple(factors["latent_shape"]))
        motion = np.asarray(factors["motion_mean"], np.float32)
        change = np.asarray(factors["appearance_change"], np.float32)
        self.clips += motion.size
        if self.hist is None and self.clips <= self.exact_clips:
            self.motion.append(motion)
            self.change.append(change)
            return
        if self.hist is None:  # past the limit: bin what was kept, then keep bins only
            self.hist = (np.zeros(len(MOTION_EDGES) + 1, np.int64), np.zeros(len(CHANGE_EDGES) + 1, np.int64))
            motion, change = np.concatenate([*self.motion, motion]), np.concatenate([*self.change, change])
            self.motion, self.change = [], []
        self.hist[0][:] += np.bincount(np.searchsorted(MOTION_EDGES, motion), minlength=len(MOTION_EDGES) + 1)
        self.hist[1][:] += np.bincount(np.searchsorted(CHANGE_EDGES, change), minlength=len(CHANGE_EDGES) + 1)

    def result(self, width: int, height: int) -> tuple[dict[str, Any] | None, str]:
        """(statistics for dataset.json, why-none)."""
        if self.older:
            return None, (f"{len(self.older)} video shard(s) (e.g. {self.older[0]}) were written by an older "
                          "prep without per-clip factors; rerun prep with --overwrite to compute statistics")
        if not self.with_factors:
            return None, "no video clips"
        if not self.clips:
            return None, "no video clip has finite motion and appearance factors"
        if len(self.shapes) != 1:
            return None, f"video shards disagree on the latent shape: {sorted(self.shapes)}"
        frames, _, h, w = next(iter(self.shapes))
        if self.hist is None:
            stats = DataStatistics.from_values(np.concatenate(self.motion), np.concatenate(self.change),
                                               frames, width, height, (h, w))
            return stats.to_dict(), ""
        # Values outside the edges sit in the end bins (index 0 and len): clamp them to the edges.
        motion_edges = np.concatenate([[MOTION_EDGES[0]], MOTION_EDGES, [MOTION_EDGES[-1]]])
        change_edges = np.concatenate([[CHANGE_EDGES[0]], CHANGE_EDGES, [CHANGE_EDGES[-1]]])
        stats = DataStatistics(self.clips, int(frames), int(width), int(height), (int(h), int(w)),
                               _hist_percentiles(self.hist[0], motion_edges, MOTION_UNITS),
                               _hist_percentiles(self.hist[1], change_edges))
        return stats.to_dict(), ""


def dataset_statistics(shard_stats: list[dict[str, Any]], width: int, height: int,
                       exact_clips: int = EXACT_CLIPS) -> tuple[dict[str, Any] | None, str]:
    """(statistics for dataset.json, why-none) over the committed video shards' stats."""
    acc = FactorStats(exact_clips)
    for stats in shard_stats:
        acc.add(stats)
    return acc.result(width, height)
