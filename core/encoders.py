"""Frozen encoders shared by preprocessing, training and sampling: the SD 2.1 VAE and the
OpenCLIP ViT-H-14 text tower (penultimate layer, 77 tokens).

A model *spec* is a string:
- `tiny`: a small random-initialised model built from the same classes (seeded, so every
  process that builds it gets the same weights); for tests, the demo and CI.
- a local path (a diffusers VAE folder; an open_clip checkpoint file), or
- a hub id (`stabilityai/stable-diffusion-2-1` for the VAE; `ViT-H-14:laion2b_s32b_b79k` for
  open_clip). Hub ids need network or a warm cache; this code never falls back silently.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

TINY_SEED = 1234

# The tiny VAE keeps SD's 8x downsampling (4 blocks) and 4 latent channels: shapes match the
# real pipeline, only widths shrink.
TINY_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 16, 32, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=64,
    scaling_factor=0.18215,
)

TINY_TEXT_WIDTH = 64


def _seeded(build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        return build()


def load_vae(spec: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """diffusers `AutoencoderKL` from `tiny`, a local diffusers folder or a hub id."""
    from diffusers import AutoencoderKL

    if spec == "tiny":
        vae = _seeded(lambda: AutoencoderKL(**TINY_VAE_CONFIG))
    elif os.path.isdir(spec):
        sub = os.path.join(spec, "vae")
        vae = AutoencoderKL.from_pretrained(sub if os.path.isdir(sub) else spec)
    else:
        # SD repos keep the VAE in a `vae` subfolder; bare VAE repos do not.
        try:
            vae = AutoencoderKL.from_pretrained(spec, subfolder="vae")
        except OSError:
            vae = AutoencoderKL.from_pretrained(spec)
    return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """Scaled latents `[B,4,F,h,w]` (or `[B,4,h,w]`) -> pixels `[B,3,F,H,W]` (or `[B,3,H,W]`) in
    [-1, 1], float32. Frames are decoded `chunk` at a time to bound memory."""
    if latents.ndim not in (4, 5) or latents.shape[1] != vae.config.latent_channels:
        raise ValueError(f"latents must be [B,{vae.config.latent_channels},F,h,w] or [B,C,h,w], "
                         f"got {tuple(latents.shape)}")
    video = latents.ndim == 5
    x = latents if video else latents[:, :, None]
    b, c, f, h, w = x.shape
    param = next(vae.parameters())
    flat = x.transpose(1, 2).reshape(b * f, c, h, w) / float(vae.config.scaling_factor)
    frames = [vae.decode(part.to(param.device, param.dtype)).sample.float().clamp(-1, 1)
              for part in flat.split(chunk)]
    out = torch.cat(frames).reshape(b, f, 3, *frames[0].shape[-2:]).transpose(1, 2)
    return out if video else out[:, :, 0]


def _tiny_clip():
    from open_clip import CLIP
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    return CLIP(
        embed_dim=32,
        vision_cfg=CLIPVisionCfg(layers=2, width=32, head_width=16, patch_size=8, image_size=32),
        text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=TINY_TEXT_WIDTH, heads=2, layers=3),
    )


def load_clip(spec: str, device: str | torch.device = "cpu"):
    """(open_clip model, tokenizer, image size). spec: `tiny`, `ARCH:TAG`, or `ARCH:/path.pt`."""
    import open_clip

    if spec == "tiny":
        model = _seeded(_tiny_clip)
        tokenizer = open_clip.get_tokenizer("ViT-H-14")
    else:
        arch, _, pretrained = spec.partition(":")
        model = open_clip.create_model(arch, pretrained=pretrained or None, device="cpu")
        tokenizer = open_clip.get_tokenizer(arch)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    return model.to(device).eval().requires_grad_(False), tokenizer, int(size)


class TextEncoder(torch.nn.Module):
    """OpenCLIP text tower up to its penultimate layer: `[B,77,width]` tokens (SD 2.x style)."""

    def __init__(self, spec: str = "ViT-H-14:laion2b_s32b_b79k", device: str | torch.device = "cpu"):
        super().__init__()
        clip, self.tokenizer, _ = load_clip(spec, device)
        self.spec = spec
        # Keep only the text tower: the vision tower of ViT-H-14 is 600M parameters.
        self.token_embedding = clip.token_embedding
        self.positional_embedding = clip.positional_embedding
        self.transformer = clip.transformer
        self.ln_final = clip.ln_final
        self.register_buffer("attn_mask", clip.attn_mask, persistent=False)
        self.requires_grad_(False).eval()

    @property
    def width(self) -> int:
        return int(self.token_embedding.embedding_dim)

    @torch.no_grad()
    def forward(self, captions: Sequence[str]) -> torch.Tensor:
        device = self.token_embedding.weight.device
        tokens = self.tokenizer(list(captions)).to(device)
        x = self.token_embedding(tokens) + self.positional_embedding
        blocks = self.transformer.resblocks
        batch_first = getattr(self.transformer, "batch_first", True)
        if not batch_first:
            x = x.permute(1, 0, 2)
        for block in blocks[: len(blocks) - 1]:  # penultimate layer, as SD 2.x
            x = block(x, attn_mask=self.attn_mask)
        if not batch_first:
            x = x.permute(1, 0, 2)
        return self.ln_final(x)
