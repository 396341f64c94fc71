"""Convolutional blocks of the UNet with ModelScope UNetSD / LDM parameter names."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.attention import TemporalModule, zero_


class TemporalConvBlock(TemporalModule):
    """ModelScope's TemporalConvBlock_v2: `layers` x (GroupNorm -> SiLU -> [Dropout] -> Conv3d (3,1,1)),
    last conv zero-initialised. Returns the residual only (the caller gates it)."""

    def __init__(self, channels: int, groups: int, layers: int = 4, dropout: float = 0.1):
        super().__init__()
        self.layers = layers
        for i in range(1, layers + 1):
            parts = [nn.GroupNorm(groups, channels), nn.SiLU()]
            if i > 1:  # keeps ModelScope's key indices: conv1.2, conv2.3, ...
                parts.append(nn.Dropout(dropout))
            parts.append(nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0)))
            setattr(self, f"conv{i}", nn.Sequential(*parts))
        zero_(getattr(self, f"conv{layers}")[-1])

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        bf, c, h, w = x.shape
        t = x.reshape(bf // frames, frames, c, h, w).transpose(1, 2)
        for i in range(1, self.layers + 1):
            t = getattr(self, f"conv{i}")(t)
        return t.transpose(1, 2).reshape(bf, c, h, w)


class ResBlock(nn.Module):
    """LDM ResBlock (time embedding added after the first conv) followed by the gated temporal conv
    stack. The attribute `temopral_conv` keeps ModelScope's spelling so checkpoints load unchanged."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, groups: int, dropout: float,
                 temporal_layers: int, temporal_dropout: float):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, in_ch), nn.SiLU(),
                                       nn.Conv2d(in_ch, out_ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_ch))
        self.out_layers = nn.Sequential(nn.GroupNorm(groups, out_ch), nn.SiLU(), nn.Dropout(dropout),
                                        zero_(nn.Conv2d(out_ch, out_ch, 3, padding=1)))
        self.skip_connection = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)
        self.temopral_conv = TemporalConvBlock(out_ch, groups, temporal_layers, temporal_dropout)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, frames: int, gate: float) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        h = self.skip_connection(x) + self.out_layers(h)
        return h + gate * self.temopral_conv(h, frames)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        # Upsampling to the skip's size (not a fixed 2x) keeps odd latent sizes working.
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)
