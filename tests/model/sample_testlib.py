"""Shared by the sampling and evaluation tests: a tiny export as `training.export` writes it,
with training statistics (or without, as older runs have none), and the one-thread fixture."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.statistics import DataStatistics
from model.checkpoint_io import save_export
from model.config import DiffusionConfig, UNetConfig
from model.unet import HiGenUNet

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "sample" / "tiny.yaml")
F, W, H = 8, 128, 64
# Training data of the tiny export: γm percentiles (10 x raw motion) and appearance change.
# With the default affine (5, -4) the change maps to γa = 5 c: [0.01, 1.0].
STATS = DataStatistics(clips=50, frames=F, width=W, height=H, latent_size=(H // 8, W // 8),
                       motion={"p1": 0.5, "p10": 1.0, "p50": 3.0, "p90": 6.0, "p99": 8.0},
                       appearance_change={"p1": 0.002, "p10": 0.02, "p50": 0.05, "p90": 0.15, "p99": 0.2})


def tiny_export(out: Path, seed: int = 0, statistics: DataStatistics | None = STATS) -> Path:
    """A tiny HiGen UNet as `training.export` writes it. The zero-initialised joins (spatial
    prior conv, guidance MLP outputs, last temporal convs) get small random weights, as training
    would give them, so the prior and the factors change the output."""
    cfg = UNetConfig.tiny(dropout=0.0, temporal_dropout=0.0)
    torch.manual_seed(seed)
    unet = HiGenUNet(cfg)
    with torch.no_grad():
        for p in unet.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    return save_export(unet, cfg, DiffusionConfig(), "tiny", "tiny", out, {"checkpoint": "step_0000010"},
                       statistics=statistics)


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny models are latency-bound: on a shared 2-core machine, 2 OpenMP threads run a
    UNet call ~30x slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
