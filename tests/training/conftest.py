"""Fixtures of the training tests: tiny shards, random init weights, the real deepspeed launcher."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from shards import make_dataset  # noqa: E402
from trainlib import TINY, launch, metrics, tail, train_args  # noqa: E402


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="session")
def init_weights(tmp_path_factory) -> Path:
    """The tiny UNet with every weight perturbed: zero-initialised output layers would leave all
    but the last layer without gradient at step 0 and make gradient checks vacuous."""
    from safetensors.torch import save_file

    from core.config import load_config
    from model.unet import HiGenUNet
    from training.config import TrainConfig

    cfg = load_config(TrainConfig, TINY)
    gen = torch.Generator().manual_seed(7)
    unet = HiGenUNet(cfg.unet)
    state = {
        k: v + 0.05 * torch.randn(v.shape, generator=gen)
        for k, v in unet.state_dict().items()
        if v.is_floating_point()
    }
    path = tmp_path_factory.mktemp("init") / "unet.safetensors"
    save_file(state, str(path))
    return path


@pytest.fixture(scope="session")
def baseline(dataset, tmp_path_factory) -> Path:
    """Uninterrupted: 4 ranks (3 video, 1 image), ZeRO-2, 2 loader workers, 5 steps, saves at 3 and 5."""
    out = tmp_path_factory.mktemp("baseline")
    done = launch("training/train.py", 4, train_args(dataset, out, "--max-steps", "5", "--save-every", "3"))
    assert done.returncode == 0, tail(done)
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4, 5]
    return out
