"""Shared helpers for the model tests: our tiny UNet and diffusers' own UNet classes built at
the matching tiny configuration (they produce the reference state dicts for the key maps)."""

from __future__ import annotations

import pytest
import torch

from model.config import UNetConfig
from model.params import param_groups
from model.unet import HiGenUNet

# Matches UNetConfig.tiny(): widths (32, 64), one res block, attention at level 0 only, head dim 16,
# context 64, 8 norm groups. diffusers' `attention_head_dim` is the head *count* in UNet2D and the
# head *size* in UNet3D (a known naming quirk): both give 16-channel heads here.
TINY_2D = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
               attention_head_dim=(2, 4), norm_num_groups=8, use_linear_projection=True)
TINY_3D = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
               down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
               up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), cross_attention_dim=64,
               attention_head_dim=16, norm_num_groups=8)


def perturb(module: torch.nn.Module, names=None, scale: float = 0.05, seed: int = 0) -> None:
    """Add seeded noise to parameters (all, or those in `names`): stands in for trained weights, so
    zero-initialised layers are no longer zero and outputs are not trivially constant."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if names is None or name in names:
                p.add_(torch.randn(p.shape, generator=gen) * scale)


def tiny_unet(seed: int = 0, pretrained_spatial: bool = True, **overrides) -> HiGenUNet:
    """Tiny UNet; with `pretrained_spatial` its spatial weights are perturbed (as if loaded from SD)
    and its temporal / guidance layers stay freshly initialised."""
    torch.manual_seed(seed)
    unet = HiGenUNet(UNetConfig.tiny(**overrides)).eval()
    if pretrained_spatial:
        perturb(unet, set(param_groups(unet)["spatial"]), seed=seed)
    return unet


def diffusers_unet(kind: str, seed: int = 0):
    from diffusers import UNet2DConditionModel, UNet3DConditionModel

    torch.manual_seed(seed)
    model = UNet2DConditionModel(**TINY_2D) if kind == "2d" else UNet3DConditionModel(**TINY_3D)
    perturb(model, seed=seed + 1)  # diffusers zero-inits some layers too: make every key matter
    return model.eval()


@pytest.fixture(scope="module")
def unet2d():
    return diffusers_unet("2d")


@pytest.fixture(scope="module")
def unet3d():
    return diffusers_unet("3d")


def inputs(batch: int = 2, frames: int = 4, h: int = 8, w: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, frames, h, w, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    ctx = torch.randn(batch, 7, 64, generator=gen)
    return x, t, ctx
