"""`SampleConfig`: the settings of `python -m model.sample` / `model.evaluate`
(configs/sample/*.yaml plus `field=value` overrides). Fields left null take the checkpoint's
training values (model/calibration.py): frames, width, height and γm (the training median).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.config import check

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_motion_factor(value: float, field: str = "motion_factor") -> None:
    check(value >= 0, field, f"the motion factor γm must be >= 0 (valid range [0, inf)), got {value:g}")


def check_appearance_factor(value: float, field: str = "appearance_factor") -> None:
    check(0.0 <= value <= 1.0, field,
          f"the appearance factor γa must be in the valid range [0, 1], got {value:g}")


@dataclass
class SampleConfig:
    # γm: 10 x the raw motion factor at the training resolution. null: the training median.
    motion_factor: float | None = None
    # γa in [0, 1] (Eq. 4); 0 = the frames keep one appearance.
    appearance_factor: float = 1.0
    frames: int | None = None  # null: the training F (other values are refused)
    width: int | None = None  # null: the training width
    height: int | None = None  # null: the training height
    steps: int | None = None  # None: the checkpoint's diffusion.sample_steps
    guidance: float | None = None  # None: the checkpoint's diffusion.guidance_scale
    seed: int = 0  # batch k uses seed + k, so one batch can be re-run alone
    fps: float = 8.0
    negative_prompt: str = ""  # the unconditional branch: "" is what text dropout trained
    batch_size: int = 4
    device: str = "auto"  # auto = cuda when available
    dtype: str = "auto"  # auto = bf16 on CUDA devices that support it, else fp32
    text: str | None = None  # override the checkpoint's text encoder spec (e.g. a local path)
    vae: str | None = None  # override the checkpoint's VAE spec
    vae_chunk: int = 8  # frames decoded at once
    gif: bool = False

    def __post_init__(self) -> None:
        if self.motion_factor is not None:
            check_motion_factor(self.motion_factor)
        check_appearance_factor(self.appearance_factor)
        check(self.frames is None or (isinstance(self.frames, int) and self.frames >= 2), "frames",
              f"must be an integer >= 2 (or null for the training F), got {self.frames!r}")
        for name in ("width", "height"):
            value = getattr(self, name)
            check(value is None or (isinstance(value, int) and value > 0 and value % 8 == 0), name,
                  f"must be a positive multiple of 8 (or null for the training size), got {value!r}")
        check(self.steps is None or (isinstance(self.steps, int) and self.steps >= 1), "steps",
              f"must be an integer >= 1, got {self.steps!r}")
        check(self.guidance is None or self.guidance >= 0, "guidance", f"must be >= 0, got {self.guidance}")
        check(isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size",
              f"must be an integer >= 1, got {self.batch_size!r}")
        check(self.fps > 0, "fps", f"must be > 0, got {self.fps}")
        check(self.dtype in ("auto", *DTYPES), "dtype",
              f"must be auto, fp32, bf16 or fp16, got {self.dtype!r}")
        check(self.vae_chunk >= 1, "vae_chunk", f"must be >= 1, got {self.vae_chunk}")


def resolve_device(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       "cpu" if device == "auto" else device)
    if dtype == "auto":
        bf16 = dev.type == "cuda" and torch.cuda.is_bf16_supported()
        return dev, torch.bfloat16 if bf16 else torch.float32
    return dev, DTYPES[dtype]
