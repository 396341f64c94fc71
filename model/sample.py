"""Text-to-video sampling from a trained HiGen checkpoint (SPEC §6).

    python -m model.sample --ckpt DIR --prompt TEXT --out FILE.mp4 [--motion 500] [--appearance 1.0]
        [--frames F] [--steps 50] [--guidance G] [--seed S] [--image REF.png] [--prompt-file FILE]
        [--save-prior FILE.npy] [--prior FILE.npy] [--gif] [--config FILE] [overrides...]

Stage 1 (text-to-image, spatial-only) gives the spatial prior z_s; stage 2 generates F frames
from it with the motion factor γm and appearance factor γa. `--image` encodes a picture with the
VAE and uses it as z_s (image-to-video: stage 1 is skipped); `--save-prior` keeps z_s, and
`--prior` reuses it with other prompts (same structure, different motion: paper Fig. 6).

Writes FILE.mp4 (H.264, yuv420p), FILE.png (contact sheet of the frames), FILE.json (settings)
and with `--gif` FILE.gif. Several prompts (`--prompt-file`, one a line) run in batches of
`batch_size` and write FILE_000.mp4, FILE_001.mp4, ...
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from core.config import ConfigError, check, load_config, to_dict
from model.checkpoint_io import CheckpointError, ModelBundle, load_for_sampling
from model.video_io import contact_sheet, load_image, to_uint8, write_gif, write_mp4

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class SampleConfig:
    motion: float = 500.0  # γm on the model's motion scale; paper: 300–600 at 448×256
    appearance: float = 1.0  # γa in [0, 1] (Eq. 4); 0 = the frames keep one appearance
    frames: int | None = None  # None: as many as the model was built for (UNetConfig.frames)
    width: int = 448
    height: int = 256
    steps: int | None = None  # None: the checkpoint's diffusion.sample_steps
    guidance: float | None = None  # None: the checkpoint's diffusion.guidance_scale
    seed: int = 0  # batch k uses seed + k, so one batch can be re-run alone
    fps: float = 8.0
    negative_prompt: str = ""  # the unconditional branch: "" is what text dropout trained
    batch_size: int = 4
    device: str = "auto"  # auto = cuda when available
    dtype: str = "auto"  # auto = bf16 on CUDA devices that support it, else fp32
    text: str | None = None  # override the checkpoint's text encoder spec (e.g. a local path)
    vae: str | None = None  # override the checkpoint's VAE spec
    vae_chunk: int = 8  # frames decoded at once
    gif: bool = False

    def __post_init__(self) -> None:
        check(self.motion >= 0, "motion", f"the motion factor γm must be >= 0, got {self.motion}")
        check(0.0 <= self.appearance <= 1.0, "appearance",
              f"the appearance factor γa must be in [0, 1], got {self.appearance}")
        check(self.frames is None or (isinstance(self.frames, int) and self.frames >= 2), "frames",
              f"must be an integer >= 2 (or null for the model's), got {self.frames!r}")
        for name in ("width", "height"):
            value = getattr(self, name)
            check(isinstance(value, int) and value > 0 and value % 8 == 0, name,
                  f"must be a positive multiple of 8 (the VAE downsamples by 8), got {value!r}")
        check(self.steps is None or (isinstance(self.steps, int) and self.steps >= 1), "steps",
              f"must be an integer >= 1, got {self.steps!r}")
        check(self.guidance is None or self.guidance >= 0, "guidance", f"must be >= 0, got {self.guidance}")
        check(isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size",
              f"must be an integer >= 1, got {self.batch_size!r}")
        check(self.fps > 0, "fps", f"must be > 0, got {self.fps}")
        check(self.dtype in ("auto", *DTYPES), "dtype",
              f"must be auto, fp32, bf16 or fp16, got {self.dtype!r}")
        check(self.vae_chunk >= 1, "vae_chunk", f"must be >= 1, got {self.vae_chunk}")


def resolve_device(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       "cpu" if device == "auto" else device)
    if dtype == "auto":
        bf16 = dev.type == "cuda" and torch.cuda.is_bf16_supported()
        return dev, torch.bfloat16 if bf16 else torch.float32
    return dev, DTYPES[dtype]


class Sampler:
    """The loaded model, text encoder and VAE; generates batches of videos."""

    def __init__(self, bundle: ModelBundle, cfg: SampleConfig):
        from core.encoders import TextEncoder, load_vae
        from model.diffusion import Diffusion

        self.cfg, self.bundle = cfg, bundle
        self.frames = cfg.frames or bundle.unet_cfg.frames
        if self.frames > bundle.unet_cfg.frames:
            most = bundle.unet_cfg.frames
            raise ValueError(f"frames={self.frames} is more than the model supports: UNetConfig.frames="
                             f"{most} in {bundle.source}; pass --frames {most} or fewer")
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
        self.null_context = self.text_encoder([cfg.negative_prompt]).to(self.dtype)
        self.latent_size = (cfg.height // 8, cfg.width // 8)
        self._bar: tqdm | None = None
        # One tick per UNet call (one per denoising step: the guidance branches run batched).
        self.unet.register_forward_hook(self._tick)

    def _tick(self, *_) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def image_prior(self, image: torch.Tensor) -> torch.Tensor:
        """Spatial prior [1,4,h,w] from a picture [3,H,W] in [-1, 1] (image-to-video)."""
        from model.sampling import encode_image_prior

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
                 motion: float | None = None,
                 appearance: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(video latents [B,4,F,h,w], spatial prior [B,4,h,w]); stage 1 runs only without `prior`."""
        from model.sampling import two_stage_sample

        motion = self.cfg.motion if motion is None else motion
        appearance = self.cfg.appearance if appearance is None else appearance
        if motion < 0:
            raise ValueError(f"the motion factor γm must be >= 0, got {motion}")
        if not 0.0 <= appearance <= 1.0:
            raise ValueError(f"the appearance factor γa must be in [0, 1], got {appearance}")
        context = self.text_encoder(prompts).to(self.dtype)
        generator = torch.Generator(self.device).manual_seed(seed)
        stages = 1 if prior is not None else 2
        desc = f"sampling {len(prompts)} video(s), γm={motion:g} γa={appearance:g}"
        with tqdm(total=self.steps * stages, desc=desc, unit="step", file=sys.stderr) as self._bar:
            try:
                video, prior = two_stage_sample(
                    self.unet, self.diffusion, context, self.null_context, frames=self.frames, motion=motion,
                    appearance=appearance, steps=self.steps, guidance=self.guidance, generator=generator,
                    spatial_prior=None if prior is None else prior.to(self.device),
                    latent_size=None if prior is not None else self.latent_size)
            finally:
                self._bar = None
        return video, prior

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """uint8 frames [B,F,H,W,3]."""
        from core.encoders import decode_latents

        return to_uint8(decode_latents(self.vae, latents.to(self.dtype), chunk=self.cfg.vae_chunk))


def read_prompts(prompt: str | None, prompt_file: str | None) -> list[str]:
    if bool(prompt) == bool(prompt_file):
        raise ValueError("pass exactly one of --prompt TEXT or --prompt-file FILE")
    if prompt:
        return [prompt]
    try:
        lines = Path(prompt_file).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--prompt-file {prompt_file}: cannot read it ({exc})") from exc
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"--prompt-file {prompt_file} holds no prompts (one a line; # starts a comment)")
    return prompts


def load_prior(path: str, batch: int, cfg: SampleConfig, channels: int = 4) -> torch.Tensor:
    """A saved spatial prior: [4,h,w], [1,4,h,w] (shared by all prompts) or one per prompt."""
    try:
        prior = torch.from_numpy(np.load(path, allow_pickle=False)).float()
    except (OSError, ValueError) as exc:
        raise ValueError(f"--prior {path}: cannot read it as a .npy array ({exc})") from exc
    shape = (channels, cfg.height // 8, cfg.width // 8)
    if prior.ndim == 3:
        prior = prior[None]
    if prior.ndim != 4 or tuple(prior.shape[1:]) != shape or prior.shape[0] not in (1, batch):
        raise ValueError(f"--prior {path}: shape {tuple(prior.shape)} does not fit; need [1 or {batch},"
                         f"{shape[0]},{shape[1]},{shape[2]}] for width={cfg.width} height={cfg.height}")
    return prior


def output_paths(out: str, count: int) -> list[Path]:
    path = Path(out)
    if path.suffix.lower() != ".mp4":
        raise ValueError(f"--out {out} must end in .mp4")
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}_{i:03d}{path.suffix}") for i in range(count)]


def run(args: argparse.Namespace, cfg: SampleConfig) -> list[Path]:
    prompts = read_prompts(args.prompt, args.prompt_file)
    if args.image and args.prior:
        raise ValueError("--image and --prior both give the spatial prior; pass one")
    outputs = output_paths(args.out, len(prompts))
    # Read the user's files before loading any model: bad input fails in a second.
    image = load_image(args.image, cfg.width, cfg.height) if args.image else None
    given = load_prior(args.prior, len(prompts), cfg) if args.prior else None
    sampler = Sampler(load_for_sampling(args.ckpt), cfg)
    if image is not None:
        given = sampler.image_prior(image)
    priors, written = [], []
    for k, start in enumerate(range(0, len(prompts), cfg.batch_size)):
        batch = prompts[start : start + cfg.batch_size]
        prior = given if given is None or given.shape[0] == 1 else given[start : start + len(batch)]
        latents, used = sampler.generate(batch, cfg.seed + k, prior)
        priors.append(used.float().cpu().expand(len(batch), -1, -1, -1))
        for i, frames in enumerate(sampler.decode(latents)):
            mp4 = outputs[start + i]
            written.append(write_outputs(mp4, frames, batch[i], cfg, sampler, args, cfg.seed + k))
    if args.save_prior:
        np.save(args.save_prior, torch.cat(priors).numpy(), allow_pickle=False)
    return written


def write_outputs(mp4: Path, frames: np.ndarray, prompt: str, cfg: SampleConfig, sampler: Sampler,
                  args: argparse.Namespace, seed: int) -> Path:
    write_mp4(frames, mp4, cfg.fps)
    contact_sheet(frames, mp4.with_suffix(".png"))
    if cfg.gif:
        write_gif(frames, mp4.with_suffix(".gif"), cfg.fps)
    meta = {"prompt": prompt, "checkpoint": sampler.bundle.source, "step": sampler.bundle.step,
            "seed": seed, "frames": sampler.frames, "steps": sampler.steps, "guidance": sampler.guidance,
            "image": args.image, "prior": args.prior, "config": to_dict(cfg)}
    mp4.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    print(f"wrote {mp4}")
    return mp4


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True,
                   help="training output dir, checkpoint dir, export dir or state dict")
    p.add_argument("--prompt", help="text prompt")
    p.add_argument("--prompt-file", help="prompts, one a line")
    p.add_argument("--out", required=True, help="output FILE.mp4 (FILE_000.mp4, ... for several prompts)")
    p.add_argument("--config", help="YAML sample config (configs/sample/*.yaml)")
    for flag, kind, what in (("motion", float, "motion factor γm"),
                             ("appearance", float, "appearance factor γa"), ("frames", int, "frames F"),
                             ("steps", int, "denoising steps"),
                             ("guidance", float, "classifier-free guidance scale"), ("seed", int, "seed")):
        p.add_argument(f"--{flag}", type=kind, help=f"{what} (overrides the config)")
    p.add_argument("--image", help="reference picture used as the spatial prior (image-to-video)")
    p.add_argument("--prior", help="spatial prior .npy saved by --save-prior (skips stage 1)")
    p.add_argument("--save-prior", help="write the spatial priors used to this .npy")
    p.add_argument("--gif", action="store_true", help="also write FILE.gif")
    p.add_argument("overrides", nargs="*", help="config overrides field=value (e.g. width=128 height=64)")
    return p


def config_from_args(args: argparse.Namespace, names: tuple[str, ...]) -> SampleConfig:
    flags = [f"{n}={getattr(args, n)}" for n in names if getattr(args, n, None) is not None]
    if getattr(args, "gif", False):
        flags.append("gif=true")
    return load_config(SampleConfig, args.config, list(args.overrides) + flags)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args, ("motion", "appearance", "frames", "steps", "guidance", "seed"))
        run(args, cfg)
    except (ConfigError, CheckpointError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
