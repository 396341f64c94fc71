"""`TrainConfig`: every training knob (docs/training.md), loaded from `configs/train/*.yaml` plus
`section.field=value` overrides through the project's one config system."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from core.config import check
from model.config import DiffusionConfig, UNetConfig

GRAD_DECAY_MODES = ("video_ranks", "all", "none")
PRECISIONS = ("auto", "bf16", "fp32")
RESUME_WORDS = ("auto", "none")


@dataclass
class ModelConfig:
    # Frozen text encoder for captions without `.text.npy` and for the empty caption of text
    # dropout. null: precomputed tokens only (then diffusion.text_dropout must be 0).
    text: str | None = "ViT-H-14:laion2b_s32b_b79k"
    # Recorded for sampling (training reads latents); `auto` takes the prep's models.vae from
    # dataset.json. Any other value must equal it.
    vae: str = "stabilityai/stable-diffusion-2-1"
    init: str | None = None  # optional safetensors state dict to start from (e.g. SD 2.1 mapped)

    def __post_init__(self) -> None:
        check(
            self.text is None or (isinstance(self.text, str) and self.text != ""),
            "text",
            "must name an open_clip spec (`ViT-H-14:laion2b_s32b_b79k`), `tiny`, or be null",
        )


@dataclass
class RolesConfig:
    # docs/method.md#ranks: a quarter of the ranks are image ranks, spread evenly (ratio 0.25 gives the
    # released code's `rank % 4 == 3`). `image_ranks` sets the count explicitly.
    image_ratio: float = 0.25
    image_ranks: int | None = None
    image_micro_batch: int = 64
    video_micro_batch: int = 3

    def __post_init__(self) -> None:
        check(
            0.0 <= self.image_ratio <= 1.0,
            "image_ratio",
            f"must be in [0, 1], got {self.image_ratio!r}",
        )
        check(
            self.image_ranks is None or (isinstance(self.image_ranks, int) and self.image_ranks >= 0),
            "image_ranks",
            f"must be null or an integer >= 0, got {self.image_ranks!r}",
        )
        for name in ("image_micro_batch", "video_micro_batch"):
            value = getattr(self, name)
            check(
                isinstance(value, int) and value >= 1,
                f"roles.{name}",
                f"must be an integer >= 1, got {value!r}",
            )


@dataclass
class DataConfig:
    num_workers: int = 2  # loader processes per rank
    prefetch_factor: int = 4  # batches each worker keeps ready
    seed: int = 0  # shard resampling and per-rank RNG seeds derive from this
    # fsspec storage options for --data, e.g. {client_kwargs: {endpoint_url: http://minio:9000}};
    # credentials are better left to the standard environment variables / instance roles.
    storage_options: dict[str, Any] = field(default_factory=dict)
    # Sample-level shuffle: each loader worker interleaves this many open shards (K) ...
    shuffle_shards: int = 8
    # ... and optionally mixes further in a buffer of this many samples (0 = none).
    shuffle_buffer: int = 0
    # Shards may be hostile: a tar member larger than this (by its header) is refused unread.
    max_member_bytes: int = 64 << 20
    read_retries: int = 5  # storage errors per shard before it is skipped
    retry_backoff_s: float = 0.2  # first retry's wait; doubles per retry, with jitter

    def __post_init__(self) -> None:
        check(self.num_workers >= 0, "num_workers", f"must be >= 0, got {self.num_workers!r}")
        for name in ("shuffle_shards", "max_member_bytes"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 1, name, f"must be an integer >= 1, got {value!r}")
        for name in ("shuffle_buffer", "read_retries"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 0, name, f"must be an integer >= 0, got {value!r}")
        check(self.retry_backoff_s >= 0, "retry_backoff_s", f"must be >= 0, got {self.retry_backoff_s!r}")
        check(
            self.prefetch_factor >= 1, "prefetch_factor", f"must be >= 1, got {self.prefetch_factor!r}"
        )


@dataclass
class OptimConfig:
    lr: float = 5e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0  # linear warmup from 0 (DeepSpeed WarmupLR); 0 = constant lr
    grad_clip: float = 1.0  # set explicitly: DeepSpeed's own default changed over versions
    spatial_grad_decay: float = 0.2  # paper §4.1
    grad_decay_mode: str = "video_ranks"  # docs/method.md#decay; `all` = released code; `none`
    ema_decay: float | None = None  # e.g. 0.9999; null = no EMA weights

    def __post_init__(self) -> None:
        for name in ("lr", "weight_decay", "eps", "grad_clip", "spatial_grad_decay"):
            value = getattr(self, name)
            # YAML reads `1e-8` (no dot) as a string: say so instead of failing deep in torch.
            check(
                isinstance(value, (int, float)) and not isinstance(value, bool),
                f"optim.{name}",
                f"must be a number, got {value!r} (write exponents with a dot: 1.0e-8)",
            )
        check(self.lr >= 0, "lr", f"must be >= 0, got {self.lr!r}")
        check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay!r}")
        check(len(self.betas) == 2, "betas", f"must be two numbers, got {self.betas!r}")
        check(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps!r}")
        check(
            self.grad_clip >= 0,
            "grad_clip",
            f"must be >= 0 (0 disables clipping), got {self.grad_clip!r}",
        )
        check(
            0.0 <= self.spatial_grad_decay <= 1.0,
            "spatial_grad_decay",
            f"must be in [0, 1], got {self.spatial_grad_decay!r}",
        )
        check(
            self.grad_decay_mode in GRAD_DECAY_MODES,
            "grad_decay_mode",
            f"must be one of {', '.join(GRAD_DECAY_MODES)}, got {self.grad_decay_mode!r}",
        )
        check(
            self.ema_decay is None or 0.0 < self.ema_decay < 1.0,
            "ema_decay",
            f"must be null or in (0, 1), got {self.ema_decay!r}",
        )


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2
    precision: str = "auto"  # auto = bf16 on CUDA devices that support it, else fp32
    gradient_accumulation_steps: int = 1
    config: dict[str, Any] = field(default_factory=dict)  # merged last into the DeepSpeed config

    def __post_init__(self) -> None:
        check(
            self.zero_stage in (1, 2, 3),
            "zero_stage",
            f"must be 1, 2 or 3, got {self.zero_stage!r}",
        )
        check(
            self.precision in PRECISIONS,
            "precision",
            f"must be one of {', '.join(PRECISIONS)}, got {self.precision!r}",
        )
        check(
            self.gradient_accumulation_steps >= 1,
            "gradient_accumulation_steps",
            f"must be >= 1, got {self.gradient_accumulation_steps!r}",
        )


@dataclass
class TrainLoopConfig:
    max_steps: int = 100_000
    save_every: int = 1000
    keep: int = 3  # newest K complete checkpoints are kept
    resume: str = "auto"  # auto | none | a checkpoint directory
    log_every: int = 10  # console progress line; metrics.jsonl gets every step
    tensorboard: bool = True
    # Optimiser steps skipped in a row (non-finite loss or gradient norm on some rank) before
    # the job stops, naming the shards of the last batches.
    max_skipped_steps: int = 10
    # `--resume PATH` outside --output loads pickles (DeepSpeed's format): only when set.
    trust_checkpoint: bool = False

    def __post_init__(self) -> None:
        check(self.max_steps >= 0, "max_steps", f"must be >= 0, got {self.max_steps!r}")
        check(self.save_every >= 1, "save_every", f"must be >= 1, got {self.save_every!r}")
        check(self.keep >= 1, "keep", f"must be >= 1, got {self.keep!r}")
        check(
            isinstance(self.resume, str) and self.resume != "", "resume", "must be auto, none or a path"
        )
        check(self.log_every >= 1, "log_every", f"must be >= 1, got {self.log_every!r}")
        check(
            isinstance(self.max_skipped_steps, int) and self.max_skipped_steps >= 1,
            "max_skipped_steps",
            f"must be an integer >= 1, got {self.max_skipped_steps!r}",
        )


@dataclass
class TrainConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)  # docs/method.md#model; text dropout: see diffusion
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    roles: RolesConfig = field(default_factory=RolesConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    # The data's statistics (core/statistics.py), copied from dataset.json at start-up so that
    # every saved config.yaml and model.yaml carries them; a value given here is replaced.
    statistics: dict | None = None

    def __post_init__(self) -> None:
        check(
            self.model.text is not None or self.diffusion.text_dropout == 0,
            "diffusion.text_dropout",
            "text dropout needs the empty caption's tokens: set model.text, or diffusion.text_dropout=0",
        )
        check(
            not (self.optim.ema_decay is not None and self.deepspeed.zero_stage == 3),
            "optim.ema_decay",
            "EMA weights need full parameters on every rank: use deepspeed.zero_stage 1 or 2, or set null",
        )
