"""The two-stage algorithm (docs/method.md#inference, paper §3.4); `model/sampler.py` wraps it with the
encoders and the checkpoint's calibration, `model/sample.py` is the CLI.

1. Spatial reasoning: a text-to-image pass (F = 1, spatial-only) gives the prior latent z_s
   (not decoded). Skipped when a `spatial_prior` is given: a user image encoded by the VAE
   (`encode_image_prior`, image-to-video) or a z_s reused across prompts (same structure,
   different motion, paper Fig. 6).
2. Temporal reasoning: F-frame noise (plus offset noise, `diffusion.sample_offset_noise`, as the
   released inference adds) with z_s as spatial prior, the motion vector filled with γm and the
   appearance matrix of Eq. 4, `A[i,j] = 1 - γa·|i-j|/(F-1)`, fed to the appearance MLP as it is
   (the training affine `a·A+b` applies to measured matrices only).

γm (`motion_factor`) is 10 x the raw motion factor (core/statistics.MOTION_UNITS, the released
code's scale): the UNet is fed γm / 10, whatever its `motion_scale` (the embedding's own scale,
10 in every shipped config). Here γm is what the model is fed; the calibration to the training
resolution lives in `model/calibration.py`.
"""

from __future__ import annotations

import torch

from core.statistics import MOTION_UNITS
from model.diffusion import Diffusion
from model.unet import HiGenUNet


def appearance_matrix(appearance_factor: float, frames: int) -> torch.Tensor:
    """Eq. 4: `[F,F]` with `A[i,j] = 1 - γa·|i-j|/(F-1)` (all ones for F = 1)."""
    if not 0.0 <= appearance_factor <= 1.0:
        raise ValueError(f"the appearance factor γa must be in [0, 1], got {appearance_factor}")
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    idx = torch.arange(frames, dtype=torch.float32)
    dist = (idx[:, None] - idx[None, :]).abs() / max(frames - 1, 1)
    return 1.0 - appearance_factor * dist


@torch.no_grad()
def encode_image_prior(vae, image: torch.Tensor) -> torch.Tensor:
    """Spatial prior from a user image `[B,3,H,W]` (or `[3,H,W]`) in [-1, 1]: the VAE posterior
    mean times the scaling factor, exactly as preprocessing stores latents. -> `[B,4,H/8,W/8]`."""
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"image must be [B,3,H,W] (or [3,H,W]) in [-1, 1], got {tuple(image.shape)}")
    param = next(vae.parameters())
    posterior = vae.encode(image.to(param.device, param.dtype)).latent_dist
    return posterior.mean.float() * float(vae.config.scaling_factor)


@torch.no_grad()
def two_stage_sample(unet: HiGenUNet, diffusion: Diffusion, context: torch.Tensor,
                     null_context: torch.Tensor | None, *, frames: int, motion_factor: float = 500.0,
                     appearance_factor: float = 1.0, steps: int = 50, guidance: float = 12.0,
                     generator: torch.Generator | None = None, spatial_prior: torch.Tensor | None = None,
                     latent_size: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (video latents `[B,4,F,h,w]`, spatial prior `[B,4,h,w]`), both float32 on the UNet's device.

    context: text tokens `[B,L,D]`; null_context: empty-caption tokens `[L,D]`/`[1,L,D]`/`[B,L,D]`
    for classifier-free guidance (None: no guidance). motion_factor = γm >= 0 as fed to the model,
    appearance_factor = γa in [0, 1].
    latent_size (h, w) is needed unless a spatial_prior `[B,4,h,w]` (or `[4,h,w]`) is given.
    """
    cfg = unet.cfg
    if context.ndim != 3:
        raise ValueError(f"context must be text tokens [B,L,D], got {tuple(context.shape)}")
    b = context.shape[0]
    if not isinstance(frames, int) or not 2 <= frames <= cfg.frames:
        raise ValueError(f"frames must be an integer in 2..{cfg.frames} (UNetConfig.frames), got {frames}")
    if motion_factor < 0:
        raise ValueError(f"the motion factor γm must be >= 0, got {motion_factor}")
    matrix = appearance_matrix(appearance_factor, frames)
    device = next(unet.parameters()).device

    if spatial_prior is None:
        if latent_size is None:
            raise ValueError("pass latent_size=(height // 8, width // 8) or a spatial_prior to fix the size")
        h, w = latent_size
        spatial_prior = diffusion.sample(unet, (b, cfg.in_channels, 1, h, w), context, null_context,
                                         spatial_only=True, steps=steps, guidance=guidance,
                                         generator=generator)[:, :, 0]
    else:
        if spatial_prior.ndim == 3:
            spatial_prior = spatial_prior[None]
        if spatial_prior.ndim != 4 or spatial_prior.shape[1] != cfg.in_channels:
            raise ValueError(f"spatial_prior must be [B,{cfg.in_channels},h,w] latents, "
                             f"got {tuple(spatial_prior.shape)}")
        if spatial_prior.shape[0] == 1 and b > 1:
            spatial_prior = spatial_prior.expand(b, -1, -1, -1)
        if spatial_prior.shape[0] != b:
            raise ValueError(f"spatial_prior batch {spatial_prior.shape[0]} does not match context batch {b}")
        if latent_size is not None and tuple(latent_size) != tuple(spatial_prior.shape[-2:]):
            raise ValueError(f"latent_size {tuple(latent_size)} disagrees with spatial_prior "
                             f"{tuple(spatial_prior.shape)}")
        spatial_prior = spatial_prior.float().to(device)
        h, w = spatial_prior.shape[-2:]

    motion_vec = torch.full((b, frames - 1), motion_factor / MOTION_UNITS, device=device)
    video = diffusion.sample(unet, (b, cfg.in_channels, frames, h, w), context, null_context,
                             spatial_prior=spatial_prior, motion=motion_vec,
                             appearance_matrix=matrix.to(device).expand(b, -1, -1),
                             steps=steps, guidance=guidance, generator=generator,
                             offset_noise=diffusion.cfg.sample_offset_noise)
    return video, spatial_prior
