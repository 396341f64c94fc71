"""Diffusion per SPEC §4: schedulers, v-prediction target, offset noise, text dropout, loss."""

from __future__ import annotations

import pytest
import torch
from model_testlib import inputs, tiny_unet

from core.config import ConfigError
from model.config import DiffusionConfig
from model.diffusion import Diffusion


def test_schedulers_are_configured_as_spec():
    diffusion = Diffusion()
    for sched in (diffusion.train_scheduler, diffusion.sample_scheduler):
        assert sched.config.num_train_timesteps == 1000
        assert sched.config.prediction_type == "v_prediction"
        assert sched.alphas_cumprod[-1] == 0  # zero terminal SNR
        assert 0.99 < sched.alphas_cumprod[0] < 1
    # The zero-SNR rescale changes the betas: check the scaled_linear endpoints on the plain schedule.
    plain = Diffusion(DiffusionConfig(rescale_betas_zero_snr=False)).train_scheduler
    torch.testing.assert_close(plain.betas[[0, -1]], torch.tensor([0.00085, 0.012]), rtol=1e-5, atol=0)
    assert plain.alphas_cumprod[-1] > 0
    sched = diffusion.sample_scheduler
    sched.set_timesteps(50)
    assert sched.config.timestep_spacing == "trailing"
    assert sched.timesteps[0] == 999 and sched.timesteps[-1] == 19 and len(sched.timesteps) == 50


class OracleV(torch.nn.Module):
    """Knows x0 = 0, so v = sqrt(ā)/sqrt(1-ā) * x_t exactly; records the contexts it is given."""

    def __init__(self, alphas_cumprod):
        super().__init__()
        self.alphas = alphas_cumprod
        self.contexts = []
        self.weight = torch.nn.Parameter(torch.ones(()))

    def forward(self, x, t, context, **kwargs):
        self.contexts.append(context)
        a = self.alphas[t].reshape(-1, 1, 1, 1, 1)
        return self.weight * x * a.sqrt() / (1 - a).clamp_min(1e-12).sqrt()


def test_v_target_with_offset_noise():
    diffusion = Diffusion(DiffusionConfig(text_dropout=0.0))
    oracle = OracleV(diffusion.train_scheduler.alphas_cumprod)
    latents = torch.zeros(16, 4, 3, 2, 2)
    ctx = torch.zeros(16, 5, 8)
    loss = diffusion.training_loss(oracle, latents, ctx, generator=torch.Generator().manual_seed(0))
    assert loss < 1e-8
    # The same oracle is wrong for an epsilon objective: the target really is v.
    eps = Diffusion(DiffusionConfig(text_dropout=0.0, prediction_type="epsilon"))
    assert eps.training_loss(oracle, latents, ctx, generator=torch.Generator().manual_seed(0)) > 0.1


def test_text_dropout_uses_null_context():
    diffusion = Diffusion(DiffusionConfig(text_dropout=0.25))
    oracle = OracleV(diffusion.train_scheduler.alphas_cumprod)
    ctx, null = torch.ones(400, 3, 8), torch.full((3, 8), -1.0)
    diffusion.training_loss(oracle, torch.zeros(400, 4, 1, 2, 2), ctx, null_context=null,
                            generator=torch.Generator().manual_seed(0))
    seen = oracle.contexts[-1]
    dropped = (seen == -1).all(dim=(1, 2))
    assert ((seen == 1).all(dim=(1, 2)) | dropped).all()
    assert 0.15 < dropped.float().mean() < 0.35
    with pytest.raises(ValueError, match="null_context"):
        diffusion.training_loss(oracle, torch.zeros(2, 4, 1, 2, 2), ctx[:2])


def test_training_loss_on_the_unet_is_reproducible_and_trains():
    unet = tiny_unet().train()
    diffusion = Diffusion()
    x, _, ctx = inputs(frames=4)
    null = torch.zeros(7, 64)
    kw = dict(spatial_prior=x[:, :, 2], motion=torch.rand(2, 3) * 40, appearance_matrix=torch.ones(2, 4, 4),
              null_context=null)
    torch.manual_seed(0)
    a = diffusion.training_loss(unet, x, ctx, generator=torch.Generator().manual_seed(3), **kw)
    torch.manual_seed(0)
    b = diffusion.training_loss(unet, x, ctx, generator=torch.Generator().manual_seed(3), **kw)
    assert a.ndim == 0 and torch.isfinite(a) and a == b
    a.backward()
    assert unet.motion_embedding.mlp[-1].weight.grad.abs().sum() > 0
    image = diffusion.training_loss(unet, x[:, :, 0], ctx, spatial_only=True, null_context=null)
    assert torch.isfinite(image)


def test_diffusion_config_validation():
    with pytest.raises(ConfigError, match="prediction_type"):
        DiffusionConfig(prediction_type="x0")
    with pytest.raises(ConfigError, match="text_dropout"):
        DiffusionConfig(text_dropout=1.0)
    with pytest.raises(ConfigError, match="timestep_spacing"):
        DiffusionConfig(timestep_spacing="middle")
