"""Config validation names the field to change; `auto` device/dtype resolve sensibly."""

from __future__ import annotations

import pytest
import torch

from core.config import ConfigError, from_dict, load_config
from preprocessing.settings import ImageConfig, ModelsConfig, VideoConfig


def test_defaults_are_the_paper_settings():
    v = VideoConfig()
    assert (v.frames, v.width, v.height, v.target_fps) == (32, 448, 256, 8.0)
    assert ImageConfig().max_pixels == 89_478_485


@pytest.mark.parametrize(
    "cls, kwargs, field",
    [
        (VideoConfig, {"frames": 1}, "video.frames"),
        (VideoConfig, {"width": 100}, "video.width"),
        (VideoConfig, {"height": 0}, "video.height"),
        (VideoConfig, {"target_fps": 0.0}, "video.target_fps"),
        (VideoConfig, {"decode_timeout_s": -1.0}, "video.decode_timeout_s"),
        (VideoConfig, {"decode_memory_mb": 64}, "video.decode_memory_mb"),
        (VideoConfig, {"decoder_recycle_every": 0}, "video.decoder_recycle_every"),
        (ImageConfig, {"width": 7}, "image.width"),
        (ImageConfig, {"max_pixels": 10}, "image.max_pixels"),
        (ModelsConfig, {"semantic": "dino"}, "models.semantic"),
        (ModelsConfig, {"device": "tpu"}, "models.device"),
        (ModelsConfig, {"dtype": "int8"}, "models.dtype"),
        (ModelsConfig, {"batch_size": 0}, "models.batch_size"),
        (ModelsConfig, {"text": ""}, "models.text"),
    ],
)
def test_bad_values_name_the_field(cls, kwargs, field):
    # Built directly, a section names its own field; through the prep config, the dotted path.
    section, name = field.split(".")
    with pytest.raises(ConfigError, match=f"'{name}'"):
        cls(**kwargs)
    from pipeline.config import PrepConfig

    with pytest.raises(ConfigError, match=f"'{field}'"):
        from_dict(PrepConfig, {section: kwargs})


def test_auto_device_and_dtype():
    cfg = ModelsConfig()
    if torch.cuda.is_available():
        assert (cfg.resolved_device(), cfg.resolved_dtype()) == ("cuda", torch.bfloat16)
    else:
        assert (cfg.resolved_device(), cfg.resolved_dtype()) == ("cpu", torch.float32)
    assert ModelsConfig(device="cpu", dtype="bf16").resolved_dtype() == torch.bfloat16


def test_loads_from_yaml_and_overrides(tmp_path):
    path = tmp_path / "video.yaml"
    path.write_text("frames: 8\nwidth: 128\nheight: 64\n")
    cfg = load_config(VideoConfig, path, ["target_fps=4", "decoder_recycle_every=3"])
    assert (cfg.frames, cfg.width, cfg.target_fps, cfg.decoder_recycle_every) == (8, 128, 4.0, 3)
    with pytest.raises(ConfigError, match="frame"):
        load_config(VideoConfig, path, ["frame=9"])  # typo: unknown key


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    path = tmp_path / "v.yaml"
    path.write_text("target_fps: 8e0\n")
    assert load_config(VideoConfig, path).target_fps == 8.0
    with pytest.raises(ConfigError, match="target_fps"):
        load_config(VideoConfig, None, ["target_fps=fast"])
