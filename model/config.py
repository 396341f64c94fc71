"""Model and diffusion configs (docs/method.md). Defaults are the full-size model: ModelScope-T2V's
UNetSD with HiGen's spatial prior, motion and appearance guidance. `UNetConfig.tiny()` is the
small random model used by tests, the demo and CI.

Both are plain dataclasses: build them from YAML with `core.config.load_config` /
`from_dict` (lists become tuples).
"""

from __future__ import annotations

from dataclasses import dataclass

from core.config import check


@dataclass
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    base_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    # Encoder res blocks per level; the decoder has one more per level (ModelScope / SD).
    num_res_blocks: int = 2
    # Levels (0 = highest resolution) with spatial + temporal transformers; the middle block
    # always has them. SD 2.1 / ModelScope: all but the lowest resolution.
    attention_levels: tuple[int, ...] = (0, 1, 2)
    head_dim: int = 64
    # The temporal transformer after the stem conv has a fixed head count (ModelScope
    # `unet_num_heads=8`, diffusers `transformer_in`), so its width is heads * head_dim.
    stem_temporal_heads: int = 8
    time_embed_dim: int = 1280
    context_dim: int = 1024
    norm_groups: int = 32
    dropout: float = 0.1
    temporal_dropout: float = 0.1
    temporal_conv_layers: int = 4
    # Frames the appearance MLP was built for (its input width); shorter clips are resampled.
    frames: int = 32
    # Motion guidance (Eq. 2): round(motion_scale * m) -> sinusoidal embedding.
    motion_scale: float = 10.0
    # Appearance guidance. Training feeds the MLP `a * A + b` of each measured similarity
    # matrix A (released code: 5, -4: raw similarities 0.8..1 -> 0..1); sampling feeds Eq. 4 as
    # it is (model/two_stage.py), so γa = 1 means a raw first-to-last similarity of -b / a.
    # `auto`: training derives a, b from the data (γa = 1 at the 99th percentile of appearance
    # change, model/calibration.py) and records the values it used with the checkpoint.
    appearance_affine: str = "fixed"
    appearance_a: float = 5.0
    appearance_b: float = -4.0
    gradient_checkpointing: bool = False
    # Released code squeezes the 77 text tokens into `text_tokens` learned tokens; off by default.
    use_text_tokens_projection: bool = False
    text_tokens: int = 16

    def __post_init__(self) -> None:
        self.channel_mult = tuple(self.channel_mult)
        self.attention_levels = tuple(self.attention_levels)
        for name in ("in_channels", "out_channels", "base_channels", "num_res_blocks", "head_dim",
                     "stem_temporal_heads", "time_embed_dim", "context_dim", "norm_groups", "frames",
                     "text_tokens"):
            check(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name,
                  f"must be a positive integer, got {getattr(self, name)!r}")
        check(len(self.channel_mult) > 0 and all(isinstance(m, int) and m > 0 for m in self.channel_mult),
              "channel_mult", f"must be a non-empty list of positive integers, got {self.channel_mult}")
        levels = len(self.channel_mult)
        check(all(0 <= lv < levels for lv in self.attention_levels), "attention_levels",
              f"levels must lie in 0..{levels - 1} (one per channel_mult entry), got {self.attention_levels}")
        widths = {self.base_channels * m for m in self.channel_mult}
        for c in sorted(widths):
            check(c % self.norm_groups == 0, "norm_groups",
                  f"{self.norm_groups} does not divide block width {c}; pick a divisor of every width")
        attn_widths = {self.base_channels * self.channel_mult[lv] for lv in self.attention_levels}
        attn_widths.add(self.base_channels * self.channel_mult[-1])  # middle block
        for c in sorted(attn_widths):
            check(c % self.head_dim == 0, "head_dim",
                  f"{self.head_dim} does not divide attention width {c}")
        check(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        check(0.0 <= self.temporal_dropout < 1.0, "temporal_dropout",
              f"must be in [0, 1), got {self.temporal_dropout}")
        check(isinstance(self.temporal_conv_layers, int) and self.temporal_conv_layers >= 2,
              "temporal_conv_layers", f"must be an integer >= 2, got {self.temporal_conv_layers}")
        check(self.motion_scale > 0, "motion_scale", f"must be > 0, got {self.motion_scale}")
        check(self.appearance_affine in ("fixed", "auto"), "appearance_affine",
              f"must be fixed (use appearance_a, appearance_b) or auto (from the data), "
              f"got {self.appearance_affine!r}")
        check(self.appearance_a != 0, "appearance_a", "must be non-zero (it scales the similarities)")

    @classmethod
    def tiny(cls, **overrides) -> UNetConfig:
        """Small random model for tests and CI (keeps every block type of the full model)."""
        values = dict(base_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0,),
                      head_dim=16, context_dim=64, time_embed_dim=128, norm_groups=8, frames=8)
        values.update(overrides)
        return cls(**values)


@dataclass
class DiffusionConfig:
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    rescale_betas_zero_snr: bool = True
    prediction_type: str = "v_prediction"
    # Training: offset noise strength (per sample, channel and frame) and text-dropout probability.
    offset_noise: float = 0.1
    text_dropout: float = 0.1
    # Sampling: DDIM with classifier-free guidance. Offset noise on the stage-2 start noise (per
    # sample, channel and frame), as the released inference adds it.
    sample_offset_noise: float = 0.1
    sample_steps: int = 50
    timestep_spacing: str = "trailing"
    guidance_scale: float = 12.0
    eta: float = 0.0

    def __post_init__(self) -> None:
        check(isinstance(self.num_train_timesteps, int) and self.num_train_timesteps > 1,
              "num_train_timesteps", f"must be an integer > 1, got {self.num_train_timesteps}")
        check(self.beta_schedule in ("linear", "scaled_linear", "squaredcos_cap_v2"), "beta_schedule",
              f"must be linear, scaled_linear or squaredcos_cap_v2, got {self.beta_schedule!r}")
        check(0 < self.beta_start < self.beta_end < 1, "beta_start",
              f"need 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}")
        check(self.prediction_type in ("v_prediction", "epsilon", "sample"), "prediction_type",
              f"must be v_prediction, epsilon or sample, got {self.prediction_type!r}")
        check(self.offset_noise >= 0, "offset_noise", f"must be >= 0, got {self.offset_noise}")
        check(self.sample_offset_noise >= 0, "sample_offset_noise",
              f"must be >= 0, got {self.sample_offset_noise}")
        check(0 <= self.text_dropout < 1, "text_dropout", f"must be in [0, 1), got {self.text_dropout}")
        check(isinstance(self.sample_steps, int) and 0 < self.sample_steps <= self.num_train_timesteps,
              "sample_steps", f"must be in 1..{self.num_train_timesteps}, got {self.sample_steps}")
        check(self.timestep_spacing in ("trailing", "leading", "linspace"), "timestep_spacing",
              f"must be trailing, leading or linspace, got {self.timestep_spacing!r}")
        check(self.guidance_scale >= 0, "guidance_scale", f"must be >= 0, got {self.guidance_scale}")
        check(0 <= self.eta <= 1, "eta", f"must be in [0, 1], got {self.eta}")
