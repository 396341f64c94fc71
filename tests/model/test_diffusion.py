"""Diffusion (docs/method.md#diffusion): schedulers, v-prediction target, offset noise, text dropout, loss."""

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


class RecordingUNet(torch.nn.Module):
    """Records the noisy input and timesteps it is given; predicts zeros."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x, t, context, **kwargs):
        self.seen.append((x.detach().clone(), t.clone()))
        return torch.zeros_like(x)


def training_noise(diffusion: Diffusion, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """The noise `training_loss` adds, recovered from x_t on zero latents: x_t = sqrt(1-ā_t)·noise."""
    unet = RecordingUNet()
    ctx = torch.zeros(shape[0], 5, 8)
    diffusion.training_loss(unet, torch.zeros(shape), ctx, generator=torch.Generator().manual_seed(seed))
    x, t = unet.seen[-1]
    a = diffusion.train_scheduler.alphas_cumprod[t].reshape(-1, *[1] * (x.ndim - 1))
    return x.double() / (1 - a.double()).sqrt()


@pytest.mark.parametrize("offset", [0.0, 0.1, 0.3])
def test_offset_noise_is_a_constant_per_sample_channel_and_frame(offset):
    # noise = N(0, 1) per element + offset * N(0, 1) per (sample, chan, frame), docs/method.md#diffusion. Over
    # the h*w pixels of one frame its mean has variance offset² + 1/(h*w); the difference of
    # two frames' means twice that (an offset shared by the frames would cancel out there).
    b, c, f, h, w = 64, 4, 4, 16, 16
    noise = training_noise(Diffusion(DiffusionConfig(text_dropout=0.0, offset_noise=offset)), (b, c, f, h, w))
    means = noise.mean(dim=(3, 4))
    per_frame = float(means.var()) - 1 / (h * w)
    across_frames = float((means[:, :, 1:] - means[:, :, :-1]).var()) / 2 - 1 / (h * w)
    assert abs(per_frame - offset**2) < 0.002 + 0.15 * offset**2, (per_frame, offset**2)
    assert abs(across_frames - offset**2) < 0.002 + 0.15 * offset**2, (across_frames, offset**2)
    # Within a frame the offset is one constant: the pixel noise around the frame mean stays N(0, 1).
    assert abs(float((noise - means[..., None, None]).std()) - 1) < 0.02


def test_default_offset_noise_is_the_released_0_1():
    b, c, f, h, w = 64, 4, 4, 16, 16
    means = training_noise(Diffusion(DiffusionConfig(text_dropout=0.0)), (b, c, f, h, w)).mean(dim=(3, 4))
    assert float(means.var()) - 1 / (h * w) == pytest.approx(0.1**2, rel=0.15)


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
