"""Shared fixtures of the per-sample preprocessing tests: tiny configs and one synthetic set."""

from __future__ import annotations

from pathlib import Path

import pytest

from preprocessing.settings import ImageConfig, ModelsConfig, VideoConfig
from preprocessing.synthetic import generate


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory) -> dict:
    """6 good videos (h264/mpeg4/vp9; 24/30/12/29.97/25 fps), 8 images, every broken input."""
    root = tmp_path_factory.mktemp("prep_synthetic")
    data = generate(root, videos=6, images=8, bad=True, seed=3, seconds=2.0)
    data["root"] = Path(root)
    return data


@pytest.fixture
def video_cfg() -> VideoConfig:
    return VideoConfig(frames=8, width=128, height=64, decode_timeout_s=30.0, decode_memory_mb=2048)


@pytest.fixture
def image_cfg() -> ImageConfig:
    return ImageConfig(width=128, height=64)


@pytest.fixture(scope="session")
def tiny_models() -> ModelsConfig:
    return ModelsConfig(vae="tiny", semantic="tiny", text=None, device="cpu", dtype="float32", batch_size=5)


@pytest.fixture(scope="session")
def encoder(tiny_models):
    from preprocessing.process import Encoder

    return Encoder(tiny_models)
