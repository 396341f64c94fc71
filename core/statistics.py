"""The training data's statistics: the contract between prep (writes them into `dataset.json`
at finalize), training (copies them into each checkpoint's config and `model.yaml`) and
sampling (defaults and range warnings for γm and γa).

    "statistics": {
      "clips": 1234,                        # video clips the percentiles were computed over
      "frames": 32, "width": 448, "height": 256,   # clip size as prep wrote it (pixels)
      "latent_size": [32, 56],              # latent h, w of the clips
      "motion": {"p1": .., "p10": .., "p50": .., "p90": .., "p99": ..},
      "appearance_change": {"p1": .., ...}
    }

- `motion`: percentiles of γm units, i.e. MOTION_UNITS (10) x the per-clip mean raw motion
  factor (docs/method.md#prep). γm has this one meaning everywhere: 10 x the raw factor at the training
  resolution; the model's `unet.motion_scale` is 10 in every shipped config.
- `appearance_change`: percentiles of `1 - A[0, F-1]` of the measured appearance matrices
  (the paper's γa of a real clip, before any affine).

core imports nothing of ours: prep, training and model all read this module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PERCENTILES = (1, 10, 50, 90, 99)
MOTION_UNITS = 10.0


class StatisticsError(ValueError):
    """A statistics section is malformed; the message names the field."""


def percentiles(values: np.ndarray) -> dict[str, float]:
    values = np.asarray(values, dtype=np.float64)
    return {f"p{p}": float(v) for p, v in zip(PERCENTILES, np.percentile(values, PERCENTILES))}


@dataclass
class DataStatistics:
    clips: int
    frames: int
    width: int
    height: int
    latent_size: tuple[int, int]
    motion: dict[str, float] = field(default_factory=dict)
    appearance_change: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_values(cls, motion_means: np.ndarray, appearance_changes: np.ndarray, frames: int,
                    width: int, height: int, latent_size: tuple[int, int]) -> DataStatistics:
        """Per-clip raw mean motion factors and appearance changes -> percentiles (γm units)."""
        motion_means = np.asarray(motion_means, dtype=np.float64)
        appearance_changes = np.asarray(appearance_changes, dtype=np.float64)
        if motion_means.size == 0 or motion_means.shape != appearance_changes.shape:
            raise StatisticsError(f"need one motion and one appearance value per clip, got "
                                  f"{motion_means.shape} and {appearance_changes.shape}")
        return cls(int(motion_means.size), int(frames), int(width), int(height),
                   (int(latent_size[0]), int(latent_size[1])),
                   percentiles(MOTION_UNITS * motion_means), percentiles(appearance_changes))

    def to_dict(self) -> dict[str, Any]:
        return {"clips": self.clips, "frames": self.frames, "width": self.width, "height": self.height,
                "latent_size": list(self.latent_size), "motion": dict(self.motion),
                "appearance_change": dict(self.appearance_change)}

    @classmethod
    def from_dict(cls, data: Any, where: str = "statistics") -> DataStatistics:
        if not isinstance(data, dict):
            raise StatisticsError(f"{where}: expected a mapping, got {type(data).__name__}")

        def need(name: str, ok, what: str):
            value = data.get(name)
            if not ok(value):
                raise StatisticsError(f"{where}.{name}: {what}, got {value!r}")
            return value

        def pcts(name: str) -> dict[str, float]:
            value = need(name, lambda v: isinstance(v, dict), "a mapping p1..p99")
            keys = [f"p{p}" for p in PERCENTILES]
            bad = [k for k in keys if not isinstance(value.get(k), int | float)]
            if bad:
                raise StatisticsError(f"{where}.{name}: needs numbers {keys}, missing or bad {bad}")
            return {k: float(value[k]) for k in keys}

        def positive(v) -> bool:
            return isinstance(v, int) and v > 0

        size = need("latent_size", lambda v: isinstance(v, list | tuple) and len(v) == 2
                    and all(positive(x) for x in v), "[h, w] positive integers")
        return cls(need("clips", positive, "a positive integer"),
                   need("frames", positive, "a positive integer"),
                   need("width", positive, "a positive integer"),
                   need("height", positive, "a positive integer"),
                   (int(size[0]), int(size[1])), pcts("motion"), pcts("appearance_change"))


def read_dataset_statistics(root: str, storage_options: dict[str, Any] | None = None
                            ) -> tuple[DataStatistics | None, str]:
    """(statistics, why-not) from `ROOT/dataset.json` (local path or fsspec URL). Outputs of
    older prep versions have none: (None, reason)."""
    import fsspec

    url = root.rstrip("/") + "/dataset.json"
    try:
        with fsspec.open(url, "rb", **(storage_options or {})) as fh:
            doc = json.loads(fh.read())
    except FileNotFoundError:
        return None, f"{url} does not exist"
    except (OSError, ValueError) as exc:
        return None, f"cannot read {url} ({exc})"
    if not isinstance(doc, dict) or doc.get("statistics") is None:
        return None, f"{url} has no 'statistics' (written by an older prep; rerun prep to add them)"
    return DataStatistics.from_dict(doc["statistics"], f"{url}: statistics"), ""
