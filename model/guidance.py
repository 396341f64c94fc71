"""HiGen's new conditioning modules (docs/method.md#model): spatial prior, motion guidance (Eq. 2), appearance
guidance, and the optional text-token projection. All are zero-initialised where they join the
backbone, so a pretrained backbone behaves exactly as before at the start of training.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.attention import Attention, TemporalModule, zero_


def sinusoidal_embedding(values: torch.Tensor, dim: int) -> torch.Tensor:
    """`[..., dim]` embedding, cos then sin (ModelScope `sinusoidal_embedding`, diffusers
    `Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0)`), computed in float32."""
    half = dim // 2
    steps = torch.arange(half, dtype=torch.float32, device=values.device)
    freqs = torch.exp(-math.log(10000.0) * steps / half)
    args = values.float()[..., None] * freqs
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def _mlp(dim_in: int, dim: int) -> nn.Sequential:
    mlp = nn.Sequential(nn.Linear(dim_in, dim), nn.SiLU(), nn.Linear(dim, dim))
    zero_(mlp[-1])
    return mlp


def _resample(x: torch.Tensor, size: int) -> torch.Tensor:
    """Linear interpolation of `[N, L, C]` along L to `size` positions (end points kept)."""
    if x.shape[1] == size:
        return x
    return F.interpolate(x.transpose(1, 2), size=size, mode="linear", align_corners=True).transpose(1, 2)


class SpatialPrior(TemporalModule):
    """Zero-initialised Conv2d on the clean prior latent z_s; added to every frame's stem output."""

    def __init__(self, in_channels: int, channels: int):
        super().__init__()
        self.conv = zero_(nn.Conv2d(in_channels, channels, 3, padding=1))

    def forward(self, prior: torch.Tensor) -> torch.Tensor:
        return self.conv(prior.to(self.conv.weight.dtype))


class MotionGuidance(TemporalModule):
    """Eq. 2: round(scale * m) -> sinusoidal embedding -> interpolate F-1 -> F -> MLP -> [B, F, E]."""

    def __init__(self, channels: int, embed_dim: int, scale: float):
        super().__init__()
        self.channels, self.scale = channels, scale
        self.mlp = _mlp(channels, embed_dim)

    def forward(self, motion: torch.Tensor, frames: int) -> torch.Tensor:
        emb = sinusoidal_embedding(torch.round(motion.float() * self.scale), self.channels)
        return self.mlp(_resample(emb, frames).to(self.mlp[0].weight.dtype))


def appearance_affine(measured: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """A measured similarity matrix -> the appearance MLP's input space: `a * A + b`. Training
    inputs only: Eq. 4 (sampling) is built in the MLP's input space already (docs/method.md#model)."""
    return a * measured.float() + b


class AppearanceGuidance(TemporalModule):
    """Each row of an appearance matrix in the MLP's input space (`a * A + b` of a measured A in
    training, Eq. 4 in sampling), resampled to the MLP's `frames` inputs -> MLP -> [B, F, E]."""

    def __init__(self, frames: int, embed_dim: int):
        super().__init__()
        self.frames = frames
        self.mlp = _mlp(frames, embed_dim)

    def forward(self, appearance_matrix: torch.Tensor) -> torch.Tensor:
        bsz, f, _ = appearance_matrix.shape
        rows = appearance_matrix.float().reshape(bsz * f, f, 1)
        rows = _resample(rows, self.frames).reshape(bsz, f, self.frames)
        return self.mlp(rows.to(self.mlp[0].weight.dtype))


class TextTokenProjection(TemporalModule):
    """Optional (off by default): squeeze the text tokens into `tokens` learned queries by one
    cross-attention layer, as the released code does."""

    def __init__(self, dim: int, tokens: int, head_dim: int):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(tokens, dim) * dim**-0.5)
        self.norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, max(1, dim // head_dim), min(head_dim, dim), context_dim=dim)
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        q = self.queries.to(context.dtype).expand(context.shape[0], -1, -1)
        return self.norm_out(q + self.attn(q, self.norm(context)))
