"""Text-to-video sampling from a trained HiGen checkpoint (docs/method.md#inference): the command line.

    python -m model.sample --ckpt DIR --prompt TEXT --out FILE.mp4 [--motion GM] [--appearance GA]
        [--frames F] [--steps 50] [--guidance G] [--seed S] [--image REF.png] [--prompt-file FILE]
        [--save-prior FILE.npy] [--prior FILE.npy] [--save-latents FILE.npy] [--gif]
        [--trust-checkpoint] [--config FILE] [overrides...]

Stage 1 (text-to-image, spatial-only) gives the spatial prior z_s; stage 2 generates F frames
from it with the motion factor γm and appearance factor γa. `--image` encodes a picture with the
VAE and uses it as z_s (image-to-video: stage 1 is skipped); `--save-prior` keeps z_s, and
`--prior` reuses it with other prompts (same structure, different motion: paper Fig. 6).

Defaults come from the checkpoint (model/sampler.py): frames, width and height are the training
ones, γm is the training median (γm = 10 x the raw motion factor at the training resolution; at
another width x height the model is fed γm x √(area ratio)). γa ∈ [0, 1]. Values outside the
training data's 1st-99th percentiles are sampled with a warning; F other than the trained F is
refused.

Writes FILE.mp4 (H.264, yuv420p), FILE.png (contact sheet of the frames), FILE.json (settings,
calibration, warnings) and with `--gif` FILE.gif; `--save-latents L.npy` writes the clip's
latents, float32 [F,4,h,w], before decoding. Several prompts (`--prompt-file`, one a line) run
in batches of `batch_size` and write FILE_000.mp4, L_000.npy, ... Bad input exits 2.

The library is model/sampler.py (Sampler), the algorithm model/two_stage.py, the config
model/sample_config.py and the files model/sample_io.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from core.config import ConfigError, load_config, to_dict
from model import sample_io
from model.checkpoint_io import CheckpointError, load_for_sampling
from model.sample_config import SampleConfig
from model.sampler import Sampler
from model.video_io import load_image

# flag -> SampleConfig field
FLAG_FIELDS = {"motion": "motion_factor", "appearance": "appearance_factor", "frames": "frames",
               "steps": "steps", "guidance": "guidance", "seed": "seed", "width": "width", "height": "height"}


def run(args: argparse.Namespace, cfg: SampleConfig) -> list[Path]:
    prompts = sample_io.read_prompts(args.prompt, args.prompt_file)
    if args.image and args.prior:
        raise ValueError("--image and --prior both give the spatial prior; pass one")
    outputs = sample_io.output_paths(args.out, len(prompts))
    # The user's files before any model: bad input fails in a second.
    latent_paths = None
    if args.save_latents:
        first = sample_io.check_writable(args.save_latents, "--save-latents", ".npy")
        latent_paths = sample_io.numbered(first, len(prompts))
    if args.save_prior:
        sample_io.check_writable(args.save_prior, "--save-prior", ".npy")
    given = sample_io.load_prior(args.prior) if args.prior else None
    if args.image:
        load_image(args.image, 64, 64)  # readable at all; re-read at the model's size below
    sampler = Sampler(load_for_sampling(args.ckpt, trust_checkpoint=args.trust_checkpoint), cfg)
    if given is not None:
        sample_io.check_prior(given, args.prior, len(prompts), sampler.bundle.unet_cfg.in_channels,
                              sampler.latent_size, sampler.width, sampler.height)
    if args.image:
        given = sampler.image_prior(load_image(args.image, sampler.width, sampler.height))
    settings = sampler.settings()
    priors, written = [], []
    for k, start in enumerate(range(0, len(prompts), cfg.batch_size)):
        batch = prompts[start : start + cfg.batch_size]
        prior = given if given is None or given.shape[0] == 1 else given[start : start + len(batch)]
        latents, used = sampler.generate(batch, cfg.seed + k, prior)
        priors.append(used.float().cpu().expand(len(batch), -1, -1, -1))
        if latent_paths is not None:
            sample_io.save_latents(latents, latent_paths[start : start + len(batch)])
        for i, frames in enumerate(sampler.decode(latents)):
            meta = {"prompt": batch[i], "checkpoint": sampler.bundle.source, "step": sampler.bundle.step,
                    "seed": cfg.seed + k, "steps": sampler.steps, "guidance": sampler.guidance,
                    "image": args.image, "prior": args.prior,
                    "latents": str(latent_paths[start + i]) if latent_paths else None,
                    **settings, "config": to_dict(cfg)}
            written.append(sample_io.write_outputs(outputs[start + i], frames, cfg.fps, cfg.gif, meta))
    if args.save_prior:
        np.save(args.save_prior, torch.cat(priors).numpy(), allow_pickle=False)
    return written


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True,
                   help="export dir (safetensors), training output dir, checkpoint dir or state dict")
    p.add_argument("--prompt", help="text prompt")
    p.add_argument("--prompt-file", help="prompts, one a line")
    p.add_argument("--out", required=True, help="output FILE.mp4 (FILE_000.mp4, ... for several prompts)")
    p.add_argument("--config", help="YAML sample config (configs/sample/*.yaml)")
    add_factor_flags(p)
    for flag, kind, what in (("frames", int, "frames F (must be the trained F)"),
                             ("steps", int, "denoising steps"),
                             ("guidance", float, "classifier-free guidance scale"), ("seed", int, "seed"),
                             ("width", int, "width (default: the training width)"),
                             ("height", int, "height (default: the training height)")):
        p.add_argument(f"--{flag}", type=kind, help=f"{what} (overrides the config)")
    p.add_argument("--image", help="reference picture used as the spatial prior (image-to-video)")
    p.add_argument("--prior", help="spatial prior .npy saved by --save-prior (skips stage 1)")
    p.add_argument("--save-prior", help="write the spatial priors used to this .npy")
    p.add_argument("--save-latents", help="write the sampled latents, float32 [F,4,h,w], to this .npy")
    p.add_argument("--gif", action="store_true", help="also write FILE.gif")
    add_trust_flag(p)
    p.add_argument("overrides", nargs="*", help="config overrides field=value (e.g. batch_size=2)")
    return p


def add_factor_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--motion", type=float,
                   help="motion factor γm >= 0: 10 x the raw motion factor at the training resolution "
                        "(default: the training median)")
    p.add_argument("--appearance", type=float, help="appearance factor γa in [0, 1] (default 1)")


def add_trust_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow a DeepSpeed checkpoint (pickles: can run code); exports never need it")


def config_from_args(args: argparse.Namespace, flags: tuple[str, ...]) -> SampleConfig:
    given = [f"{FLAG_FIELDS[n]}={getattr(args, n)}" for n in flags if getattr(args, n, None) is not None]
    if getattr(args, "gif", False):
        given.append("gif=true")
    return load_config(SampleConfig, args.config, list(args.overrides) + given)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args, tuple(FLAG_FIELDS))
        run(args, cfg)
    except (ConfigError, CheckpointError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
