"""The sampling library: a loaded checkpoint with its text encoder, VAE and calibration, that
generates batches of videos (`model/sample.py` is the CLI around it, `model/two_stage.py` the
algorithm).

Calibration (docs/method.md#calibration, model/calibration.py): frames, width and height default to the
checkpoint's training values and γm to the training median. γm means 10 x the raw motion
factor at the training resolution; at another size the model is fed γm · √(area ratio), and
`Sampler.settings` reports both. γm or γa outside the data's 1st-99th percentiles is sampled
with a warning naming the range; a checkpoint without statistics (older runs) samples with the
paper's defaults and a warning that calibration is unavailable.

Frame count: **refused** unless F equals the trained F. The appearance MLP was trained on
F x F matrices of real clips; resampling Eq. 4 to other F would feed it rows it never saw, and
the motion embedding interpolates F-1 pairs it never saw either, so the result would silently
not mean the requested γa. The error names the valid F.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from model.calibration import Calibration
from model.checkpoint_io import ModelBundle
from model.sample_config import SampleConfig, check_appearance_factor, check_motion_factor, resolve_device
from model.video_io import to_uint8


def vae_scale_factor(vae) -> int:
    """Pixels per latent cell: 2 ** (down blocks - 1), as diffusers pipelines compute it."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


class Sampler:
    """The loaded model, text encoder and VAE; generates batches of videos."""

    def __init__(self, bundle: ModelBundle, cfg: SampleConfig, log: Callable[[str], None] | None = None):
        from core.encoders import TextEncoder, load_vae
        from model.diffusion import Diffusion

        self.cfg, self.bundle = cfg, bundle
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.calibration = Calibration(bundle.unet_cfg, bundle.statistics)
        self.frames = cfg.frames or self.calibration.frames
        self.calibration.check_frames(self.frames)
        train_w, train_h = self.calibration.size
        self.width, self.height = cfg.width or train_w, cfg.height or train_h
        self.default_motion = (self.calibration.default_motion if cfg.motion_factor is None
                               else cfg.motion_factor)
        self.device, self.dtype = resolve_device(cfg.device, cfg.dtype)
        self.unet = bundle.unet.to(self.device, self.dtype)
        self.diffusion = Diffusion(bundle.diffusion_cfg)
        self.steps = cfg.steps or bundle.diffusion_cfg.sample_steps
        self.guidance = bundle.diffusion_cfg.guidance_scale if cfg.guidance is None else cfg.guidance
        self.text_encoder = TextEncoder(cfg.text or bundle.text, self.device)
        if self.text_encoder.width != bundle.unet_cfg.context_dim:
            raise ValueError(f"text encoder {self.text_encoder.spec} gives {self.text_encoder.width}-dim "
                             f"tokens, the UNet expects context_dim={bundle.unet_cfg.context_dim}")
        self.vae = load_vae(cfg.vae or bundle.vae, self.device, self.dtype)
        scale = vae_scale_factor(self.vae)
        for name, value in (("width", self.width), ("height", self.height)):
            if value % scale:
                raise ValueError(f"{name}={value} must be a multiple of {scale} (the VAE's downsampling)")
        self.latent_size = (self.height // scale, self.width // scale)
        self.motion_rescale = self.calibration.motion_scale_for(self.latent_size)
        self.null_context = self.text_encoder([cfg.negative_prompt]).to(self.dtype)
        self._warned: set[str] = set()
        self._bar: tqdm | None = None
        # One tick per UNet call (one per denoising step: the guidance branches run batched).
        self.unet.register_forward_hook(self._tick)

    def _tick(self, *_) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def settings(self, motion_factor: float | None = None,
                 appearance_factor: float | None = None) -> dict[str, Any]:
        """What a generate() call with these factors feeds the model, for logs and the JSON."""
        gm = self.default_motion if motion_factor is None else float(motion_factor)
        ga = self.cfg.appearance_factor if appearance_factor is None else float(appearance_factor)
        check_motion_factor(gm)
        check_appearance_factor(ga)
        stats = self.calibration.stats
        out: dict[str, Any] = {
            "motion_factor": gm, "appearance_factor": ga, "motion_factor_fed": gm * self.motion_rescale,
            "width": self.width, "height": self.height, "frames": self.frames,
            "latent_size": list(self.latent_size), "calibrated": self.calibration.available,
            "warnings": self.calibration.warnings(gm, ga),
        }
        if stats is not None and tuple(stats.latent_size) != self.latent_size:
            out["motion_rescale"] = {
                "factor": self.motion_rescale, "training_latent_size": list(stats.latent_size),
                "why": "the motion factor grows with √(h·w): γm (10 x the raw factor at the training "
                       "resolution) is multiplied by √(area ratio) before it reaches the model"}
        return out

    def image_prior(self, image: torch.Tensor) -> torch.Tensor:
        """Spatial prior [1,4,h,w] from a picture [3,H,W] in [-1, 1] (image-to-video)."""
        from model.two_stage import encode_image_prior

        return encode_image_prior(self.vae, image)

    @torch.no_grad()
    def spatial_prior(self, prompts: list[str], seed: int) -> torch.Tensor:
        """Stage 1 alone (text-to-image, spatial-only pass): z_s [B,4,h,w]. Lets a sweep give every
        setting the same prior (and, with the same seed, the same stage-2 noise)."""
        context = self.text_encoder(prompts).to(self.dtype)
        generator = torch.Generator(self.device).manual_seed(seed)
        shape = (len(prompts), self.bundle.unet_cfg.in_channels, 1, *self.latent_size)
        with tqdm(total=self.steps, desc=f"spatial prior of {len(prompts)} prompt(s)", unit="step",
                  file=sys.stderr) as self._bar:
            try:
                prior = self.diffusion.sample(self.unet, shape, context, self.null_context, spatial_only=True,
                                              steps=self.steps, guidance=self.guidance, generator=generator)
            finally:
                self._bar = None
        return prior[:, :, 0].float()

    @torch.no_grad()
    def generate(self, prompts: list[str], seed: int, prior: torch.Tensor | None = None,
                 motion_factor: float | None = None,
                 appearance_factor: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(video latents [B,4,F,h,w] float32, spatial prior [B,4,h,w]); stage 1 runs only without
        `prior`. Factors default to the config's (γm: the training median)."""
        from model.two_stage import two_stage_sample

        s = self.settings(motion_factor, appearance_factor)
        for warning in s["warnings"]:
            if warning not in self._warned:
                self._warned.add(warning)
                self.log(f"warning: {warning}")
        context = self.text_encoder(prompts).to(self.dtype)
        generator = torch.Generator(self.device).manual_seed(seed)
        stages = 1 if prior is not None else 2
        desc = f"sampling {len(prompts)} video(s), γm={s['motion_factor']:g} γa={s['appearance_factor']:g}"
        with tqdm(total=self.steps * stages, desc=desc, unit="step", file=sys.stderr) as self._bar:
            try:
                video, prior = two_stage_sample(
                    self.unet, self.diffusion, context, self.null_context, frames=self.frames,
                    motion_factor=s["motion_factor_fed"], appearance_factor=s["appearance_factor"],
                    steps=self.steps, guidance=self.guidance, generator=generator,
                    spatial_prior=None if prior is None else prior.to(self.device),
                    latent_size=self.latent_size)
            finally:
                self._bar = None
        return video, prior

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """uint8 frames [B,F,H,W,3]."""
        from core.encoders import decode_latents

        return to_uint8(decode_latents(self.vae, latents.to(self.dtype), chunk=self.cfg.vae_chunk))
