"""HiGenUNet: zero-initialised additions, the zero-gated spatial-only pass, checkpointing, bad input."""

from __future__ import annotations

import pytest
import torch
from model_testlib import inputs, perturb, tiny_unet

from core.config import ConfigError, from_dict
from model.config import UNetConfig
from model.params import param_groups
from model.unet import HiGenUNet, middle_frame_prior


def guidance(batch: int, frames: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    prior = torch.randn(batch, 4, 8, 8, generator=gen)
    motion = torch.rand(batch, frames - 1, generator=gen) * 60
    appearance = torch.rand(batch, frames, frames, generator=gen)
    return prior, motion, appearance


def test_guidance_is_zero_initialised():
    unet = tiny_unet()
    x, t, ctx = inputs()
    prior, motion, appearance = guidance(2, 4)
    with torch.no_grad():
        plain = unet(x, t, ctx)
        guided = unet(x, t, ctx, spatial_prior=prior, motion=motion, appearance_matrix=appearance)
    assert plain.abs().mean() > 1e-3  # the output is not trivially constant
    torch.testing.assert_close(guided, plain, rtol=0, atol=0)

    # The same check fails once the new modules have trained (non-zero) weights.
    for name in ("spatial_prior", "motion_embedding", "appearance_embedding"):
        trained = tiny_unet()
        perturb(trained, {n for n, _ in trained.named_parameters() if n.startswith(name)}, seed=3)
        with torch.no_grad():
            out = trained(x, t, ctx, spatial_prior=prior, motion=motion, appearance_matrix=appearance)
        assert (out - plain).abs().max() > 1e-4, name


def test_fresh_temporal_layers_give_the_per_frame_image_model():
    unet = tiny_unet()
    x, t, ctx = inputs(frames=4)
    prior, motion, appearance = guidance(2, 4)
    with torch.no_grad():
        video = unet(x, t, ctx, spatial_prior=prior, motion=motion, appearance_matrix=appearance)
        frames = [unet(x[:, :, f:f + 1], t, ctx, spatial_only=True) for f in range(4)]
    torch.testing.assert_close(video, torch.cat(frames, dim=2), rtol=1e-5, atol=1e-5)

    trained = tiny_unet()
    perturb(trained, set(param_groups(trained)["temporal"]), seed=5)
    with torch.no_grad():
        assert (trained(x, t, ctx) - video).abs().max() > 1e-4


def test_spatial_only_pass_gives_temporal_parameters_exact_zero_gradients():
    unet = tiny_unet().train()
    perturb(unet, seed=7)  # non-zero everywhere, so zero gradients come from the gate alone
    groups = param_groups(unet)
    x, t, ctx = inputs(frames=1)
    unet(x, t, ctx, spatial_only=True).square().mean().backward()
    params = dict(unet.named_parameters())
    for name in groups["temporal"]:
        assert params[name].grad is not None, f"{name} left the autograd graph"
        assert torch.count_nonzero(params[name].grad) == 0, name
    assert any(torch.count_nonzero(params[n].grad) > 0 for n in groups["spatial"])

    unet.zero_grad()
    x, t, ctx = inputs(frames=4)
    unet(x, t, ctx, *guidance(2, 4)).square().mean().backward()
    nonzero = [n for n in groups["temporal"] if torch.count_nonzero(params[n].grad) > 0]
    assert len(nonzero) == len(groups["temporal"])


def test_gradient_checkpointing_matches():
    unet = tiny_unet(dropout=0.0, temporal_dropout=0.0).train()
    perturb(unet, seed=11)
    x, t, ctx = inputs(frames=3)
    prior, motion, appearance = guidance(2, 3)
    results = []
    for enabled in (False, True):
        unet.zero_grad()
        unet.set_gradient_checkpointing(enabled)
        out = unet(x, t, ctx, prior, motion, appearance)
        out.square().mean().backward()
        results.append((out.detach(), [p.grad.clone() for p in unet.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_fewer_frames_than_config_and_odd_latent_sizes():
    unet = tiny_unet()
    x, t, ctx = inputs(batch=1, frames=3, h=5, w=7)
    gen = torch.Generator().manual_seed(0)
    out = unet(x, t, ctx, torch.randn(1, 4, 5, 7, generator=gen), torch.ones(1, 2), torch.ones(1, 3, 3))
    assert out.shape == x.shape


def test_text_token_projection_option():
    unet = tiny_unet(use_text_tokens_projection=True, text_tokens=4)
    x, t, ctx = inputs(frames=2)
    assert unet(x, t, ctx).shape == x.shape
    assert "text_projection.queries" in param_groups(unet)["temporal"]


@pytest.mark.parametrize("call, message", [
    (lambda u, x, t, c: u(x[:, :, 0], t, c), "x must be [B,4,F,h,w]"),
    (lambda u, x, t, c: u(x, t, c[..., :32]), "context must be text tokens [B,L,64]"),
    (lambda u, x, t, c: u(x, t, c, appearance_matrix=torch.ones(2, 5, 5)),
     "appearance_matrix must be [B,F,F]=[2, 4, 4]"),
    (lambda u, x, t, c: u(x, t, c, motion=torch.ones(2, 4)), "motion must be [B,F-1]=[2, 3]"),
    (lambda u, x, t, c: u(x, t, c, spatial_prior=torch.ones(2, 4, 4, 4)), "spatial_prior must be"),
    (lambda u, x, t, c: u(x, t, c, spatial_only=True), "spatial_only pass needs F=1"),
    (lambda u, x, t, c: u(torch.cat([x, x, x], 2), t, c), "F=12 frames exceeds UNetConfig.frames=8"),
    (lambda u, x, t, c: u(x, t[:1].repeat(3), c), "timesteps must be"),
])
def test_bad_inputs_name_the_shapes(call, message):
    unet = tiny_unet(pretrained_spatial=False)
    x, t, ctx = inputs(frames=4)
    with pytest.raises(ValueError) as err:
        call(unet, x, t, ctx)
    assert message in str(err.value)


def test_config_presets_and_validation():
    full = UNetConfig()
    assert (full.base_channels, full.channel_mult, full.attention_levels, full.frames) == (320, (1, 2, 4, 4),
                                                                                         (0, 1, 2), 32)
    from_yaml = from_dict(UNetConfig, {"base_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1,
                                       "attention_levels": [0], "head_dim": 16, "context_dim": 64,
                                       "time_embed_dim": 128, "norm_groups": 8, "frames": 8})
    assert from_yaml == UNetConfig.tiny()
    with pytest.raises(ConfigError, match="head_dim"):
        UNetConfig.tiny(head_dim=24)
    with pytest.raises(ConfigError, match="attention_levels"):
        UNetConfig.tiny(attention_levels=(0, 2))
    with pytest.raises(ConfigError, match="norm_groups"):
        UNetConfig.tiny(norm_groups=7)
    with pytest.raises(ConfigError, match="unknown config key"):
        from_dict(UNetConfig, {"base_chanels": 32})


def test_full_size_layout_builds():
    with torch.device("meta"):
        unet = HiGenUNet(UNetConfig())
    assert len(unet.input_blocks) == 12 and len(unet.output_blocks) == 12 and len(unet.middle_block) == 4
    # ModelScope's stem temporal transformer is 8 heads x 64 wide on 320 channels.
    assert tuple(unet.input_blocks[0][1].proj_in.weight.shape) == (512, 320)
    assert tuple(unet.appearance_embedding.mlp[0].weight.shape) == (1280, 32)


def test_bf16_weights_accept_float32_inputs_and_middle_frame_prior():
    unet = tiny_unet().to(torch.bfloat16)
    x, t, ctx = inputs(batch=1, frames=3)
    prior = middle_frame_prior(x)
    assert torch.equal(prior, x[:, :, 1])
    out = unet(x, t, ctx, prior, torch.ones(1, 2), torch.ones(1, 3, 3))
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    with pytest.raises(ValueError, match=r"\[B,C,F,h,w\]"):
        middle_frame_prior(x[:, :, 0])
