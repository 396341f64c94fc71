"""Train a small diffusers `AutoencoderKL` on a folder of videos and images, so that tiny-model
runs (demo, benchmarks, CI) decode to real pictures instead of the noise of a random VAE.

    python -m preprocessing.tiny_vae --data RAW --out DIR [--width 128 --height 64]
        [--cpu-seconds 180] [--steps 3000] [--seed 0]

RAW is a `python -m preprocessing.synthetic` output (its `videos.parquet` / `images.parquet`
manifests; any folder with `videos/` and `images/` works too). Frames get the same transform as
preprocessing (resize to cover, centre crop). DIR is a diffusers folder (`config.json` +
`diffusion_pytorch_model.safetensors`) that `models.vae=DIR`, `model.vae=DIR` and `vae=DIR`
accept in prep, training and sampling. Its `scaling_factor` is set to 1 / std of the posterior
means over the training frames (what SD's 0.18215 is for its own VAE), so scaled latents have
unit variance as the diffusion schedule expects. `DIR/tiny_vae.json` records the training.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from core.encoders import TINY_VAE_CONFIG
from preprocessing.transform import resize_cover

# core.encoders' `tiny` layout (SD's 8x downsampling in 4 blocks, 4 latent channels), changed
# where training on a CPU needs it. One norm group: GroupNorm over all channels and pixels keeps
# the channels' relative levels, i.e. the colour of flat regions; with one channel per group
# a flat frame normalises to zeros and colours come back wrong. No mid-block attention: cheaper
# on a CPU, and the frames need no global context. `scaling_factor` is fitted below.
VAE_CONFIG = {k: v for k, v in TINY_VAE_CONFIG.items() if k != "scaling_factor"}
VAE_CONFIG.update(norm_num_groups=1, mid_block_add_attention=False)
VIDEO_SUFFIXES = (".mp4", ".webm", ".avi", ".mkv", ".mov")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
KL_WEIGHT = 1e-6
LATENT_NOISE = 0.05  # SD's VAE recipe: the KL term only keeps the posterior from collapsing in scale


def _manifest_paths(root: Path, name: str, column: str, suffixes: tuple[str, ...]) -> list[Path]:
    manifest = root / f"{name}.parquet"
    if manifest.is_file():
        import pandas as pd

        return [Path(p) for p in pd.read_parquet(manifest, columns=[column])[column] if isinstance(p, str)]
    folder = root / name
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in suffixes) if folder.is_dir() else []


def _video_frames(path: Path, every: int) -> np.ndarray | None:
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                return None  # e.g. an audio-only file in a manifest of videos
            frames = [f.to_ndarray(format="rgb24") for i, f in enumerate(container.decode(video=0))
                      if i % every == 0]
    except Exception:  # noqa: BLE001 - a broken input costs only itself: counted as unreadable
        return None
    return np.stack(frames) if frames else None


def _image_frame(path: Path) -> np.ndarray | None:
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as img:
            return np.asarray(ImageOps.exif_transpose(img).convert("RGB"))[None]
    except Exception:  # noqa: BLE001 - truncated files, decompression bombs: counted as unreadable
        return None


def load_frames(root: str | Path, width: int, height: int, every: int = 2) -> tuple[np.ndarray, dict]:
    """uint8 [N,height,width,3] training frames of RAW, and counts (read, skipped unreadable)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--data {root}: not a folder; pass a "
                                "`python -m preprocessing.synthetic` output")
    out, counts = [], {"videos": 0, "images": 0, "unreadable": 0}
    for path in _manifest_paths(root, "videos", "video", VIDEO_SUFFIXES):
        frames = _video_frames(path, every)
        counts["videos" if frames is not None else "unreadable"] += 1
        if frames is not None:
            out.append(resize_cover(frames, width, height))
    for path in _manifest_paths(root, "images", "image", IMAGE_SUFFIXES):
        frame = _image_frame(path)
        counts["images" if frame is not None else "unreadable"] += 1
        if frame is not None:
            out.append(resize_cover(frame, width, height))
    if not out:
        raise ValueError(f"--data {root}: no readable video or image (expected videos.parquet/images.parquet "
                         f"manifests or videos/ and images/ folders); counts {counts}")
    return np.ascontiguousarray(np.concatenate(out)), counts


def _to_input(frames: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train(frames: np.ndarray, cpu_seconds: float = 150.0, steps: int = 3000, batch: int = 4,
          lr: float = 1.5e-3, seed: int = 0, log_every: int = 100):
    """Fit `AutoencoderKL(**VAE_CONFIG)` to `frames`; stops at `steps` or once the process has
    used `cpu_seconds` of CPU time (all threads: a budget that shared, busy cores cannot stretch).
    Returns (vae, history of (step, loss))."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    vae = AutoencoderKL(**VAE_CONFIG, scaling_factor=1.0).train()
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    # cosine decay to 10% over the planned steps: sharper reconstructions late in training
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    history, start, cpu0 = [], time.perf_counter(), time.process_time()
    for step in range(1, steps + 1):
        # whole frames: GroupNorm statistics of crops differ from a frame's (measured: crops
        # reconstruct at 22 dB, whole frames of the same model at 14 dB)
        x = _to_input(frames[rng.integers(0, len(frames), batch)])
        if rng.random() < 0.5:  # horizontal flips: squares move both ways
            x = x.flip(-1)
        posterior = vae.encode(x).latent_dist
        # Decode the posterior mean (what prep stores) plus a little noise, not a full posterior
        # sample: at init its std is 1 and would drown the means; the small noise teaches the
        # decoder to tolerate the imperfect latents that diffusion sampling produces.
        z = posterior.mean
        z = z + LATENT_NOISE * z.detach().std() * torch.randn_like(z)
        recon = vae.decode(z).sample
        # L1 keeps flat colour regions crisp; MSE punishes the rare big errors at square edges
        rec = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        loss = rec + KL_WEIGHT * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        history.append((step, float(rec.detach())))
        if step % log_every == 0:
            print(f"[tiny_vae] step {step} recon loss {history[-1][1]:.4f} "
                  f"({time.perf_counter() - start:.0f}s)", flush=True)
        if time.process_time() - cpu0 > cpu_seconds:
            break
    return vae.eval().requires_grad_(False), history


@torch.no_grad()
def calibrate(vae, frames: np.ndarray, chunk: int = 32, most: int = 256) -> tuple[float, float]:
    """(scaling factor 1/std of the posterior means, reconstruction PSNR in dB), over up to
    `most` whole frames spread evenly over `frames`."""
    frames = frames[np.linspace(0, len(frames) - 1, min(most, len(frames))).astype(int)]
    means, se, n = [], 0.0, 0
    for start in range(0, len(frames), chunk):
        x = _to_input(frames[start : start + chunk])
        mean = vae.encode(x).latent_dist.mean
        means.append(mean)
        recon = vae.decode(mean).sample.clamp(-1, 1)
        se += float(((recon - x) / 2).pow(2).sum())
        n += x.numel()
    std = float(torch.cat(means).std())
    psnr = 10 * math.log10(1.0 / max(se / n, 1e-12))
    return 1.0 / max(std, 1e-6), psnr


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m preprocessing.tiny_vae", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True,
                   help="synthetic corpus folder (python -m preprocessing.synthetic)")
    p.add_argument("--out", required=True, help="output diffusers folder (models.vae=OUT)")
    p.add_argument("--width", type=int, default=128, help="frame width (configs/prep/tiny.yaml: 128)")
    p.add_argument("--height", type=int, default=64, help="frame height (configs/prep/tiny.yaml: 64)")
    p.add_argument("--cpu-seconds", type=float, default=180.0,
                   help="CPU time budget of the whole command (process time, all threads)")
    p.add_argument("--steps", type=int, default=3000, help="most optimiser steps")
    p.add_argument("--batch", type=int, default=4, help="frames per step")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.width % 8 or args.height % 8 or args.width <= 0 or args.height <= 0:
        p.error(f"--width/--height must be positive multiples of 8, got {args.width}x{args.height}")
    t0, cpu0 = time.perf_counter(), time.process_time()
    try:
        frames, counts = load_frames(args.data, args.width, args.height)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}")
        return 2
    print(f"[tiny_vae] {len(frames)} frames from {counts}", flush=True)
    # keep ~10 CPU seconds for calibration and saving
    budget = max(1.0, args.cpu_seconds - 10.0 - (time.process_time() - cpu0))
    vae, history = train(frames, budget, args.steps, args.batch, seed=args.seed)
    scaling, psnr = calibrate(vae, frames)
    vae.register_to_config(scaling_factor=scaling)
    out = Path(args.out)
    vae.save_pretrained(out, safe_serialization=True)
    info = {"frames": len(frames), "sources": counts, "size": [args.width, args.height],
            "steps": len(history),
            "seconds": round(time.perf_counter() - t0, 1),
            "cpu_seconds": round(time.process_time() - cpu0, 1), "final_recon_loss": history[-1][1],
            "psnr_db": round(psnr, 2), "scaling_factor": scaling, "config": VAE_CONFIG}
    (out / "tiny_vae.json").write_text(json.dumps(info, indent=1))
    print(f"[tiny_vae] wrote {out}: {len(history)} steps in {info['seconds']}s "
          f"({info['cpu_seconds']} CPU s), PSNR {psnr:.1f} dB, scaling_factor {scaling:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
