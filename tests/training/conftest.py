"""Fixtures of the training tests: tiny shards, random init weights, the real deepspeed launcher."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from shards import make_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "train" / "tiny.yaml"
DEEPSPEED = Path(sys.executable).parent / "deepspeed"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def launch(script: str, ranks: int, args: list[str], timeout: int = 420) -> subprocess.CompletedProcess:
    """Run `script` under the real `deepspeed` launcher on `ranks` CPU processes (gloo)."""
    cmd = [str(DEEPSPEED), "--num_gpus", str(ranks), "--master_port", str(free_port()), script, *args]
    return subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)


def start(script: str, ranks: int, args: list[str], log: Path) -> subprocess.Popen:
    cmd = [str(DEEPSPEED), "--num_gpus", str(ranks), "--master_port", str(free_port()), script, *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=log.open("w"), stderr=subprocess.STDOUT)


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--config",
        str(TINY),
        "--data",
        str(data),
        "--output",
        str(out),
        "train.tensorboard=false",
        *extra,
    ]


def tail(done: subprocess.CompletedProcess | str) -> str:
    text = done if isinstance(done, str) else done.stdout + done.stderr
    return text[-6000:]


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
