"""Two-stage sampling (docs/method.md#inference), image prior and decoding helpers."""

from __future__ import annotations

import pytest
import torch
from model_testlib import perturb, tiny_unet

from core.encoders import decode_latents, load_vae
from model.config import DiffusionConfig
from model.diffusion import Diffusion
from model.params import param_groups
from model.two_stage import appearance_matrix, encode_image_prior, two_stage_sample


@pytest.fixture(scope="module")
def unet():
    model = tiny_unet()
    perturb(model, set(param_groups(model)["temporal"]), seed=9)  # as if trained: guidance matters
    return model


def _sample(unet, seed: int, diffusion: Diffusion | None = None, **kw):
    ctx = torch.randn(1, 7, 64, generator=torch.Generator().manual_seed(100))
    args = dict(frames=4, steps=2, guidance=3.0, latent_size=(8, 8))
    args.update(kw)
    gen = torch.Generator().manual_seed(seed)
    return two_stage_sample(unet, diffusion or Diffusion(), ctx, torch.zeros(7, 64), generator=gen, **args)


def test_shapes_and_determinism_per_seed(unet):
    video, prior = _sample(unet, 0)
    assert video.shape == (1, 4, 4, 8, 8) and prior.shape == (1, 4, 8, 8)
    again, prior_again = _sample(unet, 0)
    assert torch.equal(video, again) and torch.equal(prior, prior_again)
    other, _ = _sample(unet, 1)
    assert not torch.allclose(video, other)


def test_given_spatial_prior_skips_stage_one_and_is_reused(unet):
    calls = []
    hook = unet.register_forward_pre_hook(lambda m, args, kwargs: calls.append(kwargs.get("spatial_only")),
                                          with_kwargs=True)
    try:
        _, prior = _sample(unet, 0)
        assert calls == [True, True, False, False]
        calls.clear()
        video_a, reused = _sample(unet, 5, spatial_prior=prior, latent_size=None)
        assert calls == [False, False] and torch.equal(reused, prior)
    finally:
        hook.remove()
    video_b, _ = _sample(unet, 5, spatial_prior=prior, latent_size=None, motion_factor=300.0,
                         appearance_factor=0.2)
    assert not torch.allclose(video_a, video_b)  # motion / appearance reach the model


def test_stage_two_start_noise_carries_offset_noise(unet):
    """`diffusion.sample_offset_noise` adds one N(0, s) value per sample, channel and frame to the
    stage-2 start noise (the released inference's video offset noise); stage 1 gets none."""
    def first_inputs(offset: float) -> list[torch.Tensor]:
        seen: list[torch.Tensor] = []
        hook = unet.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
        try:
            _sample(unet, 3, diffusion=Diffusion(DiffusionConfig(sample_offset_noise=offset)))
        finally:
            hook.remove()
        return [seen[0], seen[2]]  # the first call of each stage (2 steps per stage)

    (image0, video0), (image1, video1) = first_inputs(0.0), first_inputs(0.5)
    assert image0.shape[2] == 1 and video0.shape[2] == 4
    torch.testing.assert_close(image1, image0)  # stage 1 untouched
    offset = video1 - video0
    assert offset.abs().mean() > 0.05  # present, ~0.5 * |N(0, 1)|
    torch.testing.assert_close(offset, offset[..., :1, :1].expand_as(offset))  # constant over h, w
    assert offset[..., 0, 0].std() > 0.05  # but differs per channel and frame


def test_appearance_matrix_eq4():
    a = appearance_matrix(0.6, 5)
    assert torch.allclose(a.diagonal(), torch.ones(5)) and torch.allclose(a, a.T)
    assert torch.isclose(a[0, 4], torch.tensor(0.4)) and torch.isclose(a[1, 3], torch.tensor(0.7))
    assert torch.equal(appearance_matrix(0.0, 4), torch.ones(4, 4))


@pytest.mark.parametrize("kw, message", [
    (dict(appearance_factor=1.5), "γa must be in \\[0, 1\\]"),
    (dict(motion_factor=-1.0), "γm must be >= 0"),
    (dict(frames=9), "frames must be an integer in 2..8"),
    (dict(latent_size=None), "latent_size"),
    (dict(spatial_prior=torch.zeros(1, 3, 8, 8)), "spatial_prior must be \\[B,4,h,w\\]"),
])
def test_bad_sampling_inputs(unet, kw, message):
    with pytest.raises(ValueError, match=message):
        _sample(unet, 0, **kw)


def test_image_to_video_prior_and_decoding(unet):
    vae = load_vae("tiny")
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    prior = encode_image_prior(vae, image)
    assert prior.shape == (1, 4, 8, 8)
    expected = vae.encode(image).latent_dist.mean * vae.config.scaling_factor
    torch.testing.assert_close(prior, expected)
    video, used = _sample(unet, 0, spatial_prior=prior, latent_size=None)
    assert torch.equal(used, prior)
    pixels = decode_latents(vae, video, chunk=3)
    assert pixels.shape == (1, 3, 4, 64, 64) and pixels.abs().max() <= 1
    torch.testing.assert_close(pixels[:, :, 2], decode_latents(vae, video[:, :, 2]))
