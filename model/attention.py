"""Transformer layers of the UNet, with the LDM / ModelScope parameter names (`to_q`, `ff.net.0.proj`,
`proj_in`, ...) so pretrained checkpoints map key for key. Attention runs through
`torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient kernels on GPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def zero_(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters: new residual branches start as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class TemporalModule(nn.Module):
    """Marker base class: every parameter below it belongs to the `temporal` group (not in SD 2.1)."""


class Attention(nn.Module):
    def __init__(self, query_dim: int, heads: int, head_dim: int, context_dim: int | None = None,
                 dropout: float = 0.0):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        ctx = x if context is None else context
        b, n, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, t.shape[1], self.heads, -1).transpose(1, 2)

        q, k, v = heads(self.to_q(x)), heads(self.to_k(ctx)), heads(self.to_v(ctx))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention (self-attention again when `context_dim` is None, as in the
    temporal transformers), GEGLU feed-forward; pre-LayerNorm residuals."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None):
        super().__init__()
        self.attn1 = Attention(dim, heads, head_dim)
        self.ff = FeedForward(dim)
        self.attn2 = Attention(dim, heads, head_dim, context_dim=context_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Per-frame attention over pixels with cross-attention to text (SD 2.1, linear projections)."""

    def __init__(self, channels: int, head_dim: int, context_dim: int, groups: int):
        super().__init__()
        heads = channels // head_dim
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        block = BasicTransformerBlock(channels, heads, head_dim, context_dim)
        self.transformer_blocks = nn.ModuleList([block])
        self.proj_out = zero_(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        bf, c, h, w = x.shape
        t = self.norm(x).permute(0, 2, 3, 1).reshape(bf, h * w, c)
        t = self.proj_in(t)
        for block in self.transformer_blocks:
            t = block(t, context)
        t = self.proj_out(t)
        return x + t.reshape(bf, h, w, c).permute(0, 3, 1, 2)


class TemporalTransformer(TemporalModule):
    """Self-attention over the frames of each pixel. Returns the residual only: the UNet adds it
    behind the zero gate. Norm statistics span all frames (ModelScope / diffusers)."""

    def __init__(self, channels: int, heads: int, head_dim: int, groups: int):
        super().__init__()
        inner = heads * head_dim
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        # ModelScope stores these as 1x1 Conv1d; a Linear is the same map (weights.py reshapes).
        self.proj_in = nn.Linear(channels, inner)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(inner, heads, head_dim)])
        self.proj_out = zero_(nn.Linear(inner, channels))

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        bf, c, h, w = x.shape
        b = bf // frames
        t = self.norm(x.reshape(b, frames, c, h, w).transpose(1, 2))  # b c f h w
        t = t.permute(0, 3, 4, 2, 1).reshape(b * h * w, frames, c)
        t = self.proj_in(t)
        for block in self.transformer_blocks:
            t = block(t)
        t = self.proj_out(t)
        return t.reshape(b, h, w, frames, c).permute(0, 3, 4, 1, 2).reshape(bf, c, h, w)
