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

from core.statistics import DataStatistics


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


def dataset_statistics(shard_stats: list[dict[str, Any]], width: int, height: int
                       ) -> tuple[dict[str, Any] | None, str]:
    """(statistics for dataset.json, why-none) over the committed video shards' stats."""
    with_factors = [s for s in shard_stats if s.get("ok") and s.get("factors")]
    older = [s["shard"] for s in shard_stats if s.get("ok") and "factors" not in s]
    if older:
        return None, (f"{len(older)} video shard(s) (e.g. {older[0]}) were written by an older prep "
                      "without per-clip factors; rerun prep with --overwrite to compute statistics")
    if not with_factors:
        return None, "no video clips"
    with_factors = [s for s in with_factors if s["factors"]["motion_mean"]]
    if not with_factors:
        return None, "no video clip has finite motion and appearance factors"
    shapes = {tuple(s["factors"]["latent_shape"]) for s in with_factors if s["factors"].get("latent_shape")}
    if len(shapes) != 1:
        return None, f"video shards disagree on the latent shape: {sorted(shapes)}"
    frames, _, h, w = next(iter(shapes))
    motion = np.concatenate([np.asarray(s["factors"]["motion_mean"], np.float32) for s in with_factors])
    change = np.concatenate([np.asarray(s["factors"]["appearance_change"], np.float32) for s in with_factors])
    stats = DataStatistics.from_values(motion, change, frames, width, height, (h, w))
    return stats.to_dict(), ""
