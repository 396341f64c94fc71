"""What γm and γa mean for one checkpoint (docs/method.md#calibration), from the training data's
statistics that the checkpoint carries (core/statistics.py).

- γm is 10 x the raw motion factor at the training resolution, one meaning everywhere. The
  factor grows with √(h·w), so sampling at another size feeds the model γm · √(area ratio)
  (`Calibration.motion_for`), and says so.
- γa ∈ [0, 1] builds Eq. 4 in the appearance MLP's input space. A real clip whose appearance
  change is c = 1 - A[0,F-1] reaches the MLP as `a·(1-c) + b` at the matrix corner, i.e. as
  γa = 1 - a - b + a·c: that is how the data's range is stated in γa units.
- `unet.appearance_affine: auto` sets a, b so that γa = 1 is the data's 99th percentile of
  appearance change and γa = 0 no change: a = 1 / p99, b = 1 - a.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from core.config import ConfigError
from core.statistics import DataStatistics
from model.config import UNetConfig

PAPER_MOTION = 500.0  # docs/method.md#inference: default γm (at 448x256): used only without statistics
PAPER_SIZE = (448, 256)  # (width, height)


def resolve_appearance_affine(unet_cfg: UNetConfig, stats: DataStatistics | None,
                              why_none: str = "") -> UNetConfig:
    """`appearance_affine: auto` -> the a, b the data implies; `fixed` is returned unchanged."""
    if unet_cfg.appearance_affine != "auto":
        return unet_cfg
    if stats is None:
        raise ConfigError(f"config field 'unet.appearance_affine': auto needs the data's statistics, "
                          f"but {why_none or 'there are none'}; rerun prep or set it to fixed",
                          field="unet.appearance_affine")
    p99 = stats.appearance_change["p99"]
    if not p99 > 1e-6:
        raise ConfigError(f"config field 'unet.appearance_affine': auto needs clips whose appearance "
                          f"changes, but the data's 99th percentile of appearance change is {p99:g}; "
                          "set it to fixed", field="unet.appearance_affine")
    a = 1.0 / p99
    return dataclasses.replace(unet_cfg, appearance_a=a, appearance_b=1.0 - a)


@dataclass
class Calibration:
    """A checkpoint's training facts for sampling; `stats` None for checkpoints of older runs."""

    unet_cfg: UNetConfig
    stats: DataStatistics | None

    @property
    def available(self) -> bool:
        return self.stats is not None

    @property
    def frames(self) -> int:
        """F the model was trained on (the appearance MLP's rows)."""
        return self.stats.frames if self.stats else self.unet_cfg.frames

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the training clips, or the paper's without statistics."""
        return (self.stats.width, self.stats.height) if self.stats else PAPER_SIZE

    @property
    def default_motion(self) -> float:
        """The training median γm, or the paper's 500 without statistics."""
        return self.stats.motion["p50"] if self.stats else PAPER_MOTION

    def motion_range(self) -> tuple[float, float]:
        return self.stats.motion["p1"], self.stats.motion["p99"]

    def appearance_range(self) -> tuple[float, float]:
        """The data's 1st-99th percentile of appearance change, in γa units (module docstring)."""
        a, b = self.unet_cfg.appearance_a, self.unet_cfg.appearance_b
        lo, hi = (1.0 - a - b + a * self.stats.appearance_change[k] for k in ("p1", "p99"))
        return min(lo, hi), max(lo, hi)

    def motion_scale_for(self, latent_size: tuple[int, int]) -> float:
        """√(area ratio) of a sampling latent size to the training one (1 without statistics)."""
        if self.stats is None:
            return 1.0
        h0, w0 = self.stats.latent_size
        return math.sqrt(latent_size[0] * latent_size[1] / (h0 * w0))

    def check_frames(self, frames: int) -> None:
        """Refuse F different from the trained F: the appearance MLP would get rows it never saw."""
        if frames != self.frames:
            source = "its training data" if self.stats else "UNetConfig.frames"
            raise ValueError(f"frames={frames}: this model was trained on {self.frames}-frame clips "
                             f"({source}); the appearance guidance only knows {self.frames}x{self.frames} "
                             f"matrices. Pass --frames {self.frames} (valid: exactly {self.frames})")

    def warnings(self, motion_factor: float, appearance_factor: float) -> list[str]:
        """Plain sentences for γm / γa outside the data's 1st-99th percentile range."""
        if self.stats is None:
            return ["calibration unavailable: the checkpoint carries no training statistics (an older "
                    f"run); γm={motion_factor:g} and γa={appearance_factor:g} are not checked against "
                    "the training data and defaults are the paper's (retrain on a current prep output)"]
        out = []
        lo, hi = self.motion_range()
        if not lo <= motion_factor <= hi:
            w, h = self.size
            out.append(f"γm={motion_factor:g} lies outside the training data's 1st-99th percentile range "
                       f"[{lo:.4g}, {hi:.4g}] (10 x the raw motion factor at {w}x{h}); the model never "
                       "saw such motion, expect it to be ignored or unstable")
        lo, hi = self.appearance_range()
        if not lo <= appearance_factor <= hi:
            out.append(f"γa={appearance_factor:g} lies outside the training data's 1st-99th percentile "
                       f"range [{lo:.4g}, {hi:.4g}] in γa units (appearance change mapped by "
                       f"a={self.unet_cfg.appearance_a:.4g}, b={self.unet_cfg.appearance_b:.4g})")
        return out
