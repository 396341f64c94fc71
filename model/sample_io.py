"""Files in and out of `python -m model.sample`: prompts, saved priors, the output paths, and
what each sample writes (MP4, contact sheet PNG, optional GIF, settings JSON, latents .npy).

Every user-supplied path is checked before a model loads, so bad input fails in a second.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.video_io import contact_sheet, write_gif, write_mp4


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


def load_prior(path: str) -> torch.Tensor:
    """A saved spatial prior as [N,C,h,w] (a [C,h,w] file gives N = 1); its size is checked
    against the model by `check_prior`."""
    try:
        prior = torch.from_numpy(np.load(path, allow_pickle=False)).float()
    except (OSError, ValueError) as exc:
        raise ValueError(f"--prior {path}: cannot read it as a .npy array ({exc})") from exc
    if prior.ndim == 3:
        prior = prior[None]
    if prior.ndim != 4:
        raise ValueError(f"--prior {path}: shape {tuple(prior.shape)} is not [N,C,h,w] or [C,h,w]")
    return prior


def check_prior(prior: torch.Tensor, path: str, batch: int, channels: int, latent_size: tuple[int, int],
                width: int, height: int) -> None:
    shape = (channels, *latent_size)
    if tuple(prior.shape[1:]) != shape or prior.shape[0] not in (1, batch):
        raise ValueError(f"--prior {path}: shape {tuple(prior.shape)} does not fit; need [1 or {batch},"
                         f"{shape[0]},{shape[1]},{shape[2]}] for width={width} height={height}")


def numbered(path: Path, count: int) -> list[Path]:
    """FILE.ext for one sample, FILE_000.ext, FILE_001.ext, ... for several."""
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}_{i:03d}{path.suffix}") for i in range(count)]


def output_paths(out: str, count: int) -> list[Path]:
    path = Path(out)
    if path.suffix.lower() != ".mp4":
        raise ValueError(f"--out {out} must end in .mp4")
    return numbered(path, count)


def check_writable(path: str, flag: str, suffix: str) -> Path:
    """Fail now, not after sampling, when `path` cannot be written."""
    target = Path(path)
    if target.suffix.lower() != suffix:
        raise ValueError(f"{flag} {path}: must end in {suffix} (valid: a writable FILE{suffix} path)")
    parent = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        why = "it is a directory"
    elif not parent.is_dir():
        why = f"directory {parent} does not exist"
    elif not os.access(parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        why = "permission denied"
    else:
        return target
    raise ValueError(f"{flag} {path}: cannot write there ({why}); valid: a writable FILE{suffix} path")


def save_latents(latents: torch.Tensor, paths: list[Path]) -> None:
    """Video latents [B,4,F,h,w] -> one float32 [F,4,h,w] .npy per clip (before decoding)."""
    for clip, path in zip(latents.float().cpu(), paths):
        np.save(path, clip.transpose(0, 1).contiguous().numpy(), allow_pickle=False)


def write_outputs(mp4: Path, frames: np.ndarray, fps: float, gif: bool, meta: dict[str, Any]) -> Path:
    write_mp4(frames, mp4, fps)
    contact_sheet(frames, mp4.with_suffix(".png"))
    if gif:
        write_gif(frames, mp4.with_suffix(".gif"), fps)
    mp4.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    print(f"wrote {mp4}")
    return mp4
