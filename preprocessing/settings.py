"""Config sections of per-sample preprocessing (docs/method.md#prep defaults: 32 frames, 448×256, 8 fps).

They are plain dataclasses so the pipeline's `PrepConfig` nests them and YAML/CLI overrides
(`video.frames=8`, `models.vae=tiny`) reach them through `core.config.load_config`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from core.config import check

# Latents are [4, H/8, W/8]: sizes that are not multiples of 8 would be cropped by the VAE.
LATENT_DOWNSAMPLE = 8
VIDEO_DECODERS = ("decord", "torchcodec", "nvdec")


def _check_size(width: int, height: int) -> None:
    for name, value in (("width", width), ("height", height)):
        check(
            isinstance(value, int) and value > 0 and value % LATENT_DOWNSAMPLE == 0,
            name,
            f"must be a positive multiple of {LATENT_DOWNSAMPLE} (the VAE downsamples by 8), got {value!r}",
        )


SPLITS = ("none", "scenes", "fixed")


def _check_split(cfg: VideoConfig) -> None:
    check(cfg.split in SPLITS, "split", f"must be one of {', '.join(SPLITS)}, got {cfg.split!r}")
    for name in ("clip_seconds", "min_clip_s", "max_clip_s", "scene_threshold"):
        value = getattr(cfg, name)
        check(
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and value >= 0,
            name,
            f"must be a number >= 0, got {value!r}",
        )
    check(cfg.clip_seconds > 0, "clip_seconds", f"must be > 0 seconds, got {cfg.clip_seconds!r}")
    check(
        cfg.max_clip_s == 0 or cfg.max_clip_s >= cfg.min_clip_s,
        "max_clip_s",
        f"must be >= video.min_clip_s ({cfg.min_clip_s}) or 0 = no limit, got {cfg.max_clip_s!r}",
    )


@dataclass
class VideoConfig:
    frames: int = 32  # F: frames per clip
    width: int = 448
    height: int = 256
    target_fps: float = 8.0
    decode_timeout_s: float = 60.0  # a decode slower than this is killed -> reason `timeout`
    decode_memory_mb: int = 4096  # address-space limit of the decoder child -> `out_of_memory`
    decoder_recycle_every: int = 200  # restart the decoder child after this many videos (leaks)
    # decord | torchcodec: CPU, in the isolated child. nvdec: on the encoder actors' GPU
    # (PyNvVideoCodec, else torchcodec's CUDA device), falling back to the CPU child per file.
    decoder: str = "decord"
    # Splitting a video whose row has no spans (preprocessing/scenes.py): `none` (one clip),
    # `scenes` (PySceneDetect's content detector on a low-resolution decode) or `fixed`
    # (windows of clip_seconds). max_clip_s cuts longer spans; spans under min_clip_s fail
    # `too_short` (with their span in the status table). 0 = no limit.
    split: str = "none"
    clip_seconds: float = 4.0
    min_clip_s: float = 0.0
    max_clip_s: float = 0.0
    scene_threshold: float = 27.0  # ContentDetector's threshold (its default)

    def __post_init__(self) -> None:
        _check_split(self)
        check(
            isinstance(self.frames, int) and self.frames >= 2,
            "frames",
            f"must be an integer >= 2 (motion factors need frame pairs), got {self.frames!r}",
        )
        _check_size(self.width, self.height)
        check(
            isinstance(self.target_fps, (int, float))
            and math.isfinite(self.target_fps)
            and self.target_fps > 0,
            "target_fps",
            f"must be a positive number of frames per second, got {self.target_fps!r}",
        )
        check(
            isinstance(self.decode_timeout_s, (int, float)) and self.decode_timeout_s > 0,
            "decode_timeout_s",
            f"must be > 0 seconds, got {self.decode_timeout_s!r}",
        )
        check(
            isinstance(self.decode_memory_mb, int) and self.decode_memory_mb >= 1024,
            "decode_memory_mb",
            f"must be an integer >= 1024 (the decoder child maps ~450 MiB of Python and ffmpeg "
            f"libraries before decoding anything), "
            f"got {self.decode_memory_mb!r}",
        )
        check(
            isinstance(self.decoder_recycle_every, int) and self.decoder_recycle_every >= 1,
            "decoder_recycle_every",
            f"must be an integer >= 1, got {self.decoder_recycle_every!r}",
        )
        check(
            self.decoder in VIDEO_DECODERS,
            "decoder",
            f"must be one of {', '.join(VIDEO_DECODERS)}, got {self.decoder!r}",
        )


@dataclass
class ImageConfig:
    width: int = 448
    height: int = 256
    # Pillow's own decompression-bomb default: larger images fail with reason `image_bomb`.
    max_pixels: int = 89_478_485

    def __post_init__(self) -> None:
        _check_size(self.width, self.height)
        check(
            isinstance(self.max_pixels, int) and self.max_pixels >= self.width * self.height,
            "max_pixels",
            f"must be an integer >= image.width*image.height ({self.width * self.height}), "
            f"got {self.max_pixels!r}",
        )


_DEVICES = ("auto", "cpu", "cuda")
_DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")


@dataclass
class ModelsConfig:
    # `tiny` = seeded random model (tests/demo); otherwise a local path or hub id.
    vae: str = "stabilityai/stable-diffusion-2-1"
    # `timm:NAME`, `open_clip:ARCH:TAG` (or `open_clip:ARCH:/path.pt`), or `tiny`.
    semantic: str = "timm:vit_small_patch14_dinov2"
    semantic_checkpoint: str | None = None  # local weights for a timm semantic model
    text: str | None = None  # e.g. `ViT-H-14:laion2b_s32b_b79k` or `tiny`; None = no text tokens
    device: str = "auto"  # auto = cuda when available, else cpu
    dtype: str = "auto"  # auto = bf16 on cuda, fp32 on cpu
    batch_size: int = 16  # frames per VAE / semantic forward pass (bounds memory)
    # Frames per encode call (several clips of a video batch, or this many images); 0 = batch_size.
    # 256 = 8 clips of 32 frames: ~90 MB of uint8 frames per call, latents a few MB.
    batch_frames: int = 0

    def __post_init__(self) -> None:
        check(
            isinstance(self.vae, str) and self.vae != "",
            "vae",
            "must name a VAE: `tiny`, a local diffusers folder or a hub id",
        )
        check(
            isinstance(self.semantic, str)
            and (self.semantic == "tiny" or self.semantic.startswith(("timm:", "open_clip:"))),
            "semantic",
            f"must be `tiny`, `timm:MODEL_NAME` or `open_clip:ARCH:TAG`, got {self.semantic!r}",
        )
        check(
            self.text is None or (isinstance(self.text, str) and self.text != ""),
            "text",
            "must be null (no text tokens) or an open_clip spec such as "
            "`ViT-H-14:laion2b_s32b_b79k` or `tiny`",
        )
        check(
            isinstance(self.device, str) and (self.device in _DEVICES or self.device.startswith("cuda:")),
            "device",
            f"must be one of {', '.join(_DEVICES)} or cuda:N, got {self.device!r}",
        )
        check(
            self.dtype in _DTYPES, "dtype", f"must be one of {', '.join(_DTYPES)}, got {self.dtype!r}"
        )
        check(
            isinstance(self.batch_size, int) and self.batch_size >= 1,
            "batch_size",
            f"must be an integer >= 1, got {self.batch_size!r}",
        )
        check(
            isinstance(self.batch_frames, int) and self.batch_frames >= 0,
            "batch_frames",
            f"must be an integer >= 0 (0 = models.batch_size), got {self.batch_frames!r}",
        )

    def frames_per_call(self) -> int:
        return self.batch_frames or self.batch_size

    def resolved_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def resolved_dtype(self):
        import torch

        names = {
            "float32": torch.float32, "fp32": torch.float32,
            "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
            "float16": torch.float16, "fp16": torch.float16,
        }
        if self.dtype == "auto":
            return torch.bfloat16 if self.resolved_device().startswith("cuda") else torch.float32
        return names[self.dtype]
