"""Diffusion (docs/method.md#diffusion) via diffusers schedulers: v-prediction with zero-terminal-SNR betas,
offset noise and text dropout in training; DDIM ("trailing" spacing) with classifier-free guidance
in sampling.

Text dropout: `training_loss` drops each sample's text itself, with probability
`DiffusionConfig.text_dropout`, replacing its tokens by `null_context` (the text encoder's tokens
for the empty caption, `TextEncoder([""])`). The caller must pass `null_context` unless
`text_dropout` is 0; there is no silent fallback (zero tokens are not the unconditional branch
that sampling uses).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler

from model.config import DiffusionConfig


def _rand(shape, generator: torch.Generator | None, like: torch.Tensor, normal: bool = True) -> torch.Tensor:
    """Random numbers drawn on the generator's device (reproducible per seed), moved to `like`."""
    device = generator.device if generator is not None else like.device
    fn = torch.randn if normal else torch.rand
    return fn(shape, generator=generator, device=device, dtype=torch.float32).to(like.device)


def _batch_context(null_context: torch.Tensor, batch: int, like: torch.Tensor) -> torch.Tensor:
    """`[L,D]`, `[1,L,D]` or `[B,L,D]` null tokens -> `[B,L,D]` matching `like`."""
    if null_context.ndim == 2:
        null_context = null_context[None]
    if null_context.ndim != 3 or null_context.shape[0] not in (1, batch) \
            or null_context.shape[1:] != like.shape[1:]:
        raise ValueError(f"null_context must be [L,D], [1,L,D] or [B,L,D] matching context "
                         f"{tuple(like.shape)}, got {tuple(null_context.shape)}")
    return null_context.to(like).expand(batch, -1, -1)


class Diffusion:
    def __init__(self, cfg: DiffusionConfig | None = None):
        self.cfg = cfg = cfg or DiffusionConfig()
        common = dict(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                      beta_start=cfg.beta_start, beta_end=cfg.beta_end, prediction_type=cfg.prediction_type,
                      rescale_betas_zero_snr=cfg.rescale_betas_zero_snr, clip_sample=False)
        self.train_scheduler = DDPMScheduler(**common)
        self.sample_scheduler = DDIMScheduler(**common, timestep_spacing=cfg.timestep_spacing)

    # -- training ---------------------------------------------------------------------------------

    def training_loss(self, unet, latents: torch.Tensor, context: torch.Tensor,
                      spatial_prior: torch.Tensor | None = None, motion: torch.Tensor | None = None,
                      appearance_matrix: torch.Tensor | None = None, spatial_only: bool = False,
                      generator: torch.Generator | None = None,
                      null_context: torch.Tensor | None = None) -> torch.Tensor:
        """MSE between the UNet output and the v target on `latents` `[B,4,F,h,w]` (images:
        `[B,4,h,w]` or `[B,4,1,h,w]` with `spatial_only=True`). Returns a float32 scalar."""
        cfg = self.cfg
        if latents.ndim == 4:
            latents = latents[:, :, None]
        if latents.ndim != 5:
            raise ValueError(f"latents must be [B,C,F,h,w] (or [B,C,h,w] images), got {tuple(latents.shape)}")
        b, c, f = latents.shape[:3]
        if cfg.text_dropout > 0:
            if null_context is None:
                raise ValueError("training_loss needs null_context (tokens of the empty caption, "
                                 "TextEncoder(['']) ) to apply text dropout; or set diffusion.text_dropout=0")
            drop = _rand((b,), generator, context, normal=False) < cfg.text_dropout
            context = torch.where(drop[:, None, None], _batch_context(null_context, b, context), context)

        gen_device = generator.device if generator is not None else latents.device
        t = torch.randint(0, cfg.num_train_timesteps, (b,), generator=generator, device=gen_device)
        t = t.to(latents.device)
        noise = _rand(latents.shape, generator, latents)
        if cfg.offset_noise > 0:
            # Per sample, channel and frame (the released code's video offset noise).
            noise = noise + cfg.offset_noise * _rand((b, c, f, 1, 1), generator, latents)
        x0 = latents.float()
        noisy = self.train_scheduler.add_noise(x0, noise, t)
        if cfg.prediction_type == "v_prediction":
            target = self.train_scheduler.get_velocity(x0, noise, t)
        elif cfg.prediction_type == "epsilon":
            target = noise
        else:
            target = x0
        pred = unet(noisy.to(latents.dtype), t, context, spatial_prior=spatial_prior, motion=motion,
                    appearance_matrix=appearance_matrix, spatial_only=spatial_only)
        return F.mse_loss(pred.float(), target)

    # -- sampling ---------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, unet, shape: tuple[int, ...], context: torch.Tensor, null_context: torch.Tensor | None,
               *, spatial_prior: torch.Tensor | None = None, motion: torch.Tensor | None = None,
               appearance_matrix: torch.Tensor | None = None, spatial_only: bool = False,
               steps: int | None = None, guidance: float | None = None,
               generator: torch.Generator | None = None, offset_noise: float = 0.0) -> torch.Tensor:
        """DDIM sampling of latents of `shape` `[B,4,F,h,w]` with classifier-free guidance
        `uncond + guidance * (cond - uncond)`; the unconditional branch uses `null_context` and
        the same spatial prior / motion / appearance matrix. guidance 1 (or null_context None) = no
        CFG. `offset_noise` adds `offset_noise * N(0, 1)` per sample, channel and frame to the start
        noise (the released inference does so for videos; `DiffusionConfig.sample_offset_noise`)."""
        cfg = self.cfg
        steps = cfg.sample_steps if steps is None else steps
        guidance = cfg.guidance_scale if guidance is None else guidance
        if not 0 < steps <= cfg.num_train_timesteps:
            raise ValueError(f"steps must be in 1..{cfg.num_train_timesteps}, got {steps}")
        param = next(unet.parameters())
        b = shape[0]
        context = context.to(param.device)
        use_cfg = null_context is not None and guidance != 1.0
        if use_cfg:
            context = torch.cat([_batch_context(null_context.to(param.device), b, context), context])

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else (torch.cat([t, t]) if use_cfg else t).to(param.device)

        cond = dict(spatial_prior=move(spatial_prior), motion=move(motion),
                    appearance_matrix=move(appearance_matrix))

        scheduler = DDIMScheduler.from_config(self.sample_scheduler.config)
        scheduler.set_timesteps(steps, device=param.device)
        x = _rand(shape, generator, param)
        if offset_noise > 0:
            x = x + offset_noise * _rand((*shape[:3], *[1] * (len(shape) - 3)), generator, param)
        x = x * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            inp = torch.cat([x, x]) if use_cfg else x
            tt = t.expand(inp.shape[0]).to(param.device)
            out = unet(inp.to(param.dtype), tt, context, spatial_only=spatial_only, **cond).float()
            if use_cfg:
                uncond, cond_out = out.chunk(2)
                out = uncond + guidance * (cond_out - uncond)
            x = scheduler.step(out, t, x, eta=cfg.eta, generator=generator).prev_sample
        return x
