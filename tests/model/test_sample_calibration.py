"""Calibrated controls (docs/method.md#calibration): defaults from the checkpoint's training statistics,
warnings naming the data's range, γm rescaled at another resolution, Eq. 4 fed to the MLP as
it is, `appearance_affine: auto`, and checkpoints of older runs (no statistics)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from sample_testlib import STATS, TINY, F, H, W, one_thread, tiny_export  # noqa: F401

from core.config import ConfigError, load_config
from core.statistics import MOTION_UNITS, DataStatistics
from model import sample
from model.calibration import resolve_appearance_affine
from model.checkpoint_io import load_for_sampling
from model.config import UNetConfig
from model.guidance import appearance_affine
from model.sample_config import SampleConfig
from model.sampler import Sampler
from model.two_stage import appearance_matrix


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    return tiny_export(tmp_path_factory.mktemp("export") / "export")


def _sampler(export_dir, *overrides: str) -> Sampler:
    return Sampler(load_for_sampling(export_dir), load_config(SampleConfig, TINY, ["steps=2", *overrides]))


def _stage2_inputs(sampler: Sampler, **kw) -> dict:
    """The keyword inputs of the first stage-2 UNet call of one generate()."""
    seen: list[dict] = []

    def grab(_m, args, kwargs):
        if args[0].shape[2] > 1 and not seen:
            seen.append(kwargs)

    hook = sampler.unet.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        sampler.generate(["a red ball"], seed=0, **kw)
    finally:
        hook.remove()
    return seen[0]


def test_defaults_are_the_training_values(export_dir):
    sampler = _sampler(export_dir)
    s = sampler.settings()
    assert (sampler.frames, sampler.width, sampler.height) == (F, W, H)
    assert s["motion_factor"] == STATS.motion["p50"] == s["motion_factor_fed"]
    assert s["calibrated"] and s["warnings"] == [] and "motion_rescale" not in s
    fed = _stage2_inputs(sampler)
    # γm reaches the model as the raw factor γm / motion_scale on every frame pair.
    torch.testing.assert_close(fed["motion"], torch.full((2, F - 1), 3.0 / 10.0))


def test_eq4_reaches_the_appearance_mlp_as_it_is(export_dir):
    """The affine a*A+b is for measured matrices only: with γa = 0.7 the appearance MLP's input
    rows are Eq. 4 itself (the released inference's meaning)."""
    sampler = _sampler(export_dir)
    rows: list[torch.Tensor] = []
    mlp = sampler.unet.appearance_embedding.mlp
    hook = mlp.register_forward_pre_hook(lambda _m, args: rows.append(args[0]))
    try:
        fed = _stage2_inputs(sampler, appearance_factor=0.7)
    finally:
        hook.remove()
    expected = appearance_matrix(0.7, F)
    torch.testing.assert_close(fed["appearance_matrix"], expected.expand(2, F, F))  # CFG: 2 branches
    stage2 = [r for r in rows if tuple(r.shape) == (2, F, F)]  # stage 1 rows are [2, 1, F]
    assert stage2, "the appearance MLP never saw the stage-2 rows"
    torch.testing.assert_close(stage2[0], expected.expand(2, F, F))


def test_out_of_range_factors_warn_naming_the_range(export_dir, tmp_path, capsys):
    sampler = _sampler(export_dir)
    (motion,) = sampler.settings(motion_factor=500.0, appearance_factor=0.5)["warnings"]
    assert "γm=500" in motion and "[0.5, 8]" in motion and "128x64" in motion
    (appearance,) = sampler.settings(motion_factor=3.0, appearance_factor=0.0)["warnings"]
    assert "γa=0" in appearance and "[0.01, 1]" in appearance  # 5 x change p1..p99
    out = tmp_path / "w.mp4"
    assert sample.main(["--ckpt", str(export_dir), "--out", str(out), "--config", TINY, "--steps", "2",
                        "--prompt", "p", "--motion", "500"]) == 0
    assert "warning: γm=500 lies outside" in capsys.readouterr().err
    assert any("[0.5, 8]" in w for w in json.loads(out.with_suffix(".json").read_text())["warnings"])


def test_other_resolution_rescales_motion_and_says_so(export_dir, tmp_path):
    sampler = _sampler(export_dir, f"width={2 * W}", f"height={2 * H}")
    assert sampler.latent_size == (2 * H // 8, 2 * W // 8)
    s = sampler.settings(motion_factor=4.0)
    assert s["motion_factor_fed"] == pytest.approx(8.0)  # √(4x the area) = 2
    assert s["motion_rescale"]["factor"] == pytest.approx(2.0)
    assert s["motion_rescale"]["training_latent_size"] == [H // 8, W // 8]
    fed = _stage2_inputs(sampler, motion_factor=4.0)
    torch.testing.assert_close(fed["motion"], torch.full((2, F - 1), 0.8))
    out = tmp_path / "big.mp4"
    assert sample.main(["--ckpt", str(export_dir), "--out", str(out), "--config", TINY, "--steps", "1",
                        "--prompt", "p", "--motion", "4", "--width", str(2 * W), "--height", str(2 * H)]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["motion_factor"] == 4.0 and meta["motion_factor_fed"] == pytest.approx(8.0)
    assert "√(area ratio)" in meta["motion_rescale"]["why"]


def test_checkpoint_without_statistics_samples_with_a_warning(tmp_path, capsys):
    old = tiny_export(tmp_path / "old", statistics=None)
    out = tmp_path / "old.mp4"
    args = ["--ckpt", str(old), "--out", str(out), "--config", TINY, "--steps", "1", "--prompt", "p",
            f"width={W}", f"height={H}"]
    assert sample.main(args) == 0
    assert "warning: calibration unavailable" in capsys.readouterr().err
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["calibrated"] is False and meta["motion_factor"] == 500.0 and meta["frames"] == F


def test_shipped_configs_keep_motion_scale_ten():
    """γm has one meaning (10 x the raw factor); the motion embedding's scale matches it."""
    from training.config import TrainConfig

    configs = sorted((Path(TINY).parents[1] / "train").glob("*.yaml"))
    assert configs
    for path in configs:
        assert load_config(TrainConfig, path).unet.motion_scale == MOTION_UNITS == 10.0, path


def test_appearance_affine_auto_puts_gamma_a_one_at_the_99th_percentile():
    cfg = resolve_appearance_affine(UNetConfig.tiny(appearance_affine="auto"), STATS)
    p99 = STATS.appearance_change["p99"]
    assert cfg.appearance_a == pytest.approx(1 / p99)
    assert cfg.appearance_a + cfg.appearance_b == pytest.approx(1)
    # A clip at the 99th percentile of change reaches the MLP as Eq. 4 with γa = 1 does (corner 0);
    # a clip without change as γa = 0 (corner 1).
    corner = appearance_affine(torch.tensor([1 - p99, 1.0]), cfg.appearance_a, cfg.appearance_b)
    torch.testing.assert_close(corner, torch.tensor([appearance_matrix(1.0, F)[0, -1], 1.0]))
    fixed = UNetConfig.tiny()
    assert resolve_appearance_affine(fixed, STATS) is fixed
    with pytest.raises(ConfigError, match="unet.appearance_affine.*rerun prep"):
        resolve_appearance_affine(UNetConfig.tiny(appearance_affine="auto"), None, "no dataset.json")
    static = DataStatistics(**{**STATS.__dict__,
                               "appearance_change": dict.fromkeys(STATS.appearance_change, 0.0)})
    with pytest.raises(ConfigError, match="99th percentile of appearance change is 0"):
        resolve_appearance_affine(UNetConfig.tiny(appearance_affine="auto"), static)
    with pytest.raises(ConfigError, match="appearance_affine"):
        UNetConfig.tiny(appearance_affine="learned")
