"""HiGen 3D-UNet (docs/method.md#model): ModelScope-T2V's UNetSD, key for key, plus the spatial prior and the
motion / appearance guidance.

One forward serves both passes:
- video (temporal reasoning): x `[B,4,F,h,w]`, spatial prior `[B,4,h,w]`, raw motion factors
  `[B,F-1]`, appearance matrix `[B,F,F]`;
- spatial-only (spatial reasoning, image ranks, stage-1 sampling): F = 1. Every temporal layer and
  guidance module still runs but its output is multiplied by a gate of 0 (`h + g * temporal(h)`):
  each rank runs the same autograd graph, which ZeRO needs (docs/method.md#ranks), and the temporal parameters
  get exactly zero gradient.

`slots` records, for every backbone module, its name in the diffusers and LDM layouts: weights.py
builds its key maps from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.attention import SpatialTransformer, TemporalTransformer
from model.blocks import Downsample, ResBlock, Upsample
from model.config import UNetConfig
from model.guidance import (
    AppearanceGuidance,
    MotionGuidance,
    SpatialPrior,
    TextTokenProjection,
    sinusoidal_embedding,
)


@dataclass(frozen=True)
class Slot:
    """A backbone module: our name, its kind, and its names in the diffusers UNet2D/3D and LDM
    (SD 2.1 original) layouts. `ldm` is None for temporal modules (absent from SD 2.1)."""

    ours: str
    kind: str  # conv_in | time | res | tconv | spatial | temporal | down | up | out
    diffusers: str
    ldm: str | None

    @property
    def temporal(self) -> bool:
        return self.ldm is None


class HiGenUNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        self.gradient_checkpointing = cfg.gradient_checkpointing
        base, emb = cfg.base_channels, cfg.time_embed_dim
        slots: list[Slot] = []

        def res(ch_in: int, ch_out: int, ours: str, diff: str, diff_t: str, ldm: str) -> ResBlock:
            slots.append(Slot(ours, "res", diff, ldm))
            slots.append(Slot(f"{ours}.temopral_conv", "tconv", diff_t, None))
            return ResBlock(ch_in, ch_out, emb, cfg.norm_groups, cfg.dropout, cfg.temporal_conv_layers,
                            cfg.temporal_dropout)

        def attn(ch: int, ours: str, diff: str, diff_t: str, ldm: str) -> list[nn.Module]:
            slots.append(Slot(f"{ours}.1", "spatial", diff, ldm))
            slots.append(Slot(f"{ours}.2", "temporal", diff_t, None))
            return [SpatialTransformer(ch, cfg.head_dim, cfg.context_dim, cfg.norm_groups),
                    TemporalTransformer(ch, ch // cfg.head_dim, cfg.head_dim, cfg.norm_groups)]

        self.time_embed = nn.Sequential(nn.Linear(base, emb), nn.SiLU(), nn.Linear(emb, emb))
        slots += [Slot("time_embed.0", "time", "time_embedding.linear_1", "time_embed.0"),
                  Slot("time_embed.2", "time", "time_embedding.linear_2", "time_embed.2")]
        self.spatial_prior = SpatialPrior(cfg.in_channels, base)
        self.motion_embedding = MotionGuidance(base, emb, cfg.motion_scale)
        self.appearance_embedding = AppearanceGuidance(cfg.frames, emb)
        self.text_projection = (TextTokenProjection(cfg.context_dim, cfg.text_tokens, cfg.head_dim)
                                if cfg.use_text_tokens_projection else None)

        # Encoder. Stem: conv, then a temporal transformer with a fixed head count.
        self.input_blocks = nn.ModuleList([nn.ModuleList([
            nn.Conv2d(cfg.in_channels, base, 3, padding=1),
            TemporalTransformer(base, cfg.stem_temporal_heads, cfg.head_dim, cfg.norm_groups)])])
        slots += [Slot("input_blocks.0.0", "conv_in", "conv_in", "input_blocks.0.0"),
                  Slot("input_blocks.0.1", "temporal", "transformer_in", None)]
        skips, ch, last = [base], base, len(cfg.channel_mult) - 1
        for level, mult in enumerate(cfg.channel_mult):
            out, d = base * mult, f"down_blocks.{level}"
            for j in range(cfg.num_res_blocks):
                p = f"input_blocks.{len(self.input_blocks)}"
                block = [res(ch, out, f"{p}.0", f"{d}.resnets.{j}", f"{d}.temp_convs.{j}", f"{p}.0")]
                if level in cfg.attention_levels:
                    block += attn(out, p, f"{d}.attentions.{j}", f"{d}.temp_attentions.{j}", f"{p}.1")
                self.input_blocks.append(nn.ModuleList(block))
                ch = out
                skips.append(ch)
            if level != last:
                p = f"input_blocks.{len(self.input_blocks)}"
                # ModelScope appends the Downsample bare; SD wraps it in a sequential (`.0`).
                slots.append(Slot(p, "down", f"{d}.downsamplers.0", f"{p}.0"))
                self.input_blocks.append(Downsample(ch))
                skips.append(ch)

        m = "mid_block"
        self.middle_block = nn.ModuleList([
            res(ch, ch, "middle_block.0", f"{m}.resnets.0", f"{m}.temp_convs.0", "middle_block.0"),
            *attn(ch, "middle_block", f"{m}.attentions.0", f"{m}.temp_attentions.0", "middle_block.1"),
            res(ch, ch, "middle_block.3", f"{m}.resnets.1", f"{m}.temp_convs.1", "middle_block.2")])

        self.output_blocks = nn.ModuleList()
        for i, level in enumerate(reversed(range(len(cfg.channel_mult)))):
            out, u = base * cfg.channel_mult[level], f"up_blocks.{i}"
            for j in range(cfg.num_res_blocks + 1):
                p = f"output_blocks.{len(self.output_blocks)}"
                block = [res(ch + skips.pop(), out, f"{p}.0", f"{u}.resnets.{j}", f"{u}.temp_convs.{j}",
                             f"{p}.0")]
                if level in cfg.attention_levels:
                    block += attn(out, p, f"{u}.attentions.{j}", f"{u}.temp_attentions.{j}", f"{p}.1")
                ch = out
                if level != 0 and j == cfg.num_res_blocks:
                    # SD has no temporal transformer, so its upsampler sits one index earlier.
                    ldm_index = 2 if level in cfg.attention_levels else 1
                    slots.append(Slot(f"{p}.{len(block)}", "up", f"{u}.upsamplers.0", f"{p}.{ldm_index}"))
                    block.append(Upsample(out))
                self.output_blocks.append(nn.ModuleList(block))

        self.out = nn.Sequential(nn.GroupNorm(cfg.norm_groups, base), nn.SiLU(),
                                 nn.Conv2d(base, cfg.out_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)  # as ModelScope
        slots += [Slot("out.0", "out", "conv_norm_out", "out.0"), Slot("out.2", "out", "conv_out", "out.2")]
        self.slots: tuple[Slot, ...] = tuple(slots)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.gradient_checkpointing = enabled

    # -- forward ----------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                spatial_prior: torch.Tensor | None = None, motion: torch.Tensor | None = None,
                appearance_matrix: torch.Tensor | None = None, spatial_only: bool = False) -> torch.Tensor:
        """Predict `[B,4,F,h,w]` from noisy latents x `[B,4,F,h,w]`, timesteps `[B]` (or a scalar),
        text tokens `[B,L,D]`.

        Video pass: a missing spatial prior is zeros, missing motion zeros, a missing appearance
        matrix all ones (no appearance change). `appearance_matrix` `[B,F,F]` is in the appearance
        MLP's input space: Eq. 4 as it is, or `guidance.appearance_affine` of a measured matrix.
        Spatial-only pass (F must be 1): the neutral
        inputs are always used (zero prior, motion 0, appearance ones); the given ones are ignored,
        and every temporal layer and guidance module runs behind a zero gate.
        """
        cfg = self.cfg
        b, _, frames, h, w = self._check_inputs(x, timesteps, context, spatial_prior, motion,
                                                appearance_matrix, spatial_only)
        timesteps = (timesteps.reshape(-1).expand(b) if timesteps.numel() == 1 else timesteps).to(x.device)
        gate = 0.0 if spatial_only else 1.0
        if spatial_only or spatial_prior is None:
            spatial_prior = x.new_zeros(b, cfg.in_channels, h, w)
        if spatial_only or motion is None:
            motion = x.new_zeros(b, max(frames - 1, 1))
        if spatial_only or appearance_matrix is None:
            appearance_matrix = x.new_ones(b, frames, frames)

        weight = self.time_embed[0].weight
        t_emb = self.time_embed(sinusoidal_embedding(timesteps, cfg.base_channels).to(weight.dtype))
        guide = self.motion_embedding(motion, frames) + self.appearance_embedding(appearance_matrix)
        emb = (t_emb[:, None] + gate * guide).reshape(b * frames, -1)  # (b f) order, like x below
        context = context.to(weight.dtype)
        if self.text_projection is not None:
            context = self.text_projection(context)
        context = context.repeat_interleave(frames, dim=0)
        prior = self.spatial_prior(spatial_prior).repeat_interleave(frames, dim=0)

        hs = x.transpose(1, 2).reshape(b * frames, cfg.in_channels, h, w).to(weight.dtype)
        hs = self._call(_run_stem, self.input_blocks[0], hs, prior, frames, gate)
        skips = [hs]
        for block in self.input_blocks[1:]:
            hs = self._call(_run_block, block, hs, emb, context, frames, gate, None)
            skips.append(hs)
        hs = self._call(_run_block, self.middle_block, hs, emb, context, frames, gate, None)
        for block in self.output_blocks:
            hs = torch.cat([hs, skips.pop()], dim=1)
            size = tuple(skips[-1].shape[-2:]) if skips else None
            hs = self._call(_run_block, block, hs, emb, context, frames, gate, size)
        hs = self.out(hs)
        return hs.reshape(b, frames, -1, h, w).transpose(1, 2)

    def _call(self, fn, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def _check_inputs(self, x, timesteps, context, spatial_prior, motion, appearance_matrix, spatial_only):
        cfg = self.cfg

        def fail(msg: str):
            raise ValueError(f"HiGenUNet.forward: {msg}")

        if x.ndim != 5 or x.shape[1] != cfg.in_channels:
            fail(f"x must be [B,{cfg.in_channels},F,h,w] latents, got shape {tuple(x.shape)}")
        b, _, frames, h, w = x.shape
        if spatial_only and frames != 1:
            fail(f"spatial_only pass needs F=1, got x of shape {tuple(x.shape)} (F={frames}); "
                 "pass images as [B,4,1,h,w]")
        if frames > cfg.frames:
            fail(f"F={frames} frames exceeds UNetConfig.frames={cfg.frames} "
                 "(the appearance MLP's input width)")
        if not torch.is_tensor(timesteps) or timesteps.numel() not in (1, b) or timesteps.ndim > 1:
            shape = tuple(timesteps.shape) if torch.is_tensor(timesteps) else type(timesteps).__name__
            fail(f"timesteps must be a tensor [B]=[{b}] or a scalar tensor, got {shape}")
        if context.ndim != 3 or context.shape[0] != b or context.shape[2] != cfg.context_dim:
            fail(f"context must be text tokens [B,L,{cfg.context_dim}] with B={b}, "
                 f"got {tuple(context.shape)}")
        if spatial_only:
            return b, cfg.in_channels, frames, h, w
        if spatial_prior is not None and tuple(spatial_prior.shape) != (b, cfg.in_channels, h, w):
            fail(f"spatial_prior must be [B,{cfg.in_channels},h,w]={[b, cfg.in_channels, h, w]} to match x "
                 f"{tuple(x.shape)}, got {tuple(spatial_prior.shape)}")
        if motion is not None and tuple(motion.shape) != (b, frames - 1):
            fail(f"motion must be [B,F-1]={[b, frames - 1]} for x {tuple(x.shape)}, "
                 f"got {tuple(motion.shape)}")
        if frames == 1 and motion is not None:
            fail("motion factors need F >= 2 frames; a single frame has no frame pairs")
        if appearance_matrix is not None and tuple(appearance_matrix.shape) != (b, frames, frames):
            fail(f"appearance_matrix must be [B,F,F]={[b, frames, frames]} for x {tuple(x.shape)}, "
                 f"got {tuple(appearance_matrix.shape)}")
        return b, cfg.in_channels, frames, h, w


def middle_frame_prior(latents: torch.Tensor) -> torch.Tensor:
    """Training spatial prior z_s of a clip `[B,C,F,h,w]`: its middle frame F // 2 (docs/method.md#prior)."""
    if latents.ndim != 5:
        raise ValueError(f"latents must be [B,C,F,h,w], got {tuple(latents.shape)}")
    return latents[:, :, latents.shape[2] // 2]


def _run_stem(stem, hs, prior, frames, gate):
    """Stem conv, plus the spatial prior embedding on every frame, then the temporal transformer."""
    conv, temporal = stem
    hs = conv(hs) + gate * prior
    return hs + gate * temporal(hs, frames)


def _run_block(block, hs, emb, context, frames, gate, size):
    """Run one ModelScope block (a module list, or a bare Downsample) on `(b f) c h w` features."""
    if isinstance(block, Downsample):
        return block(hs)
    for layer in block:
        if isinstance(layer, ResBlock):
            hs = layer(hs, emb, frames, gate)
        elif isinstance(layer, SpatialTransformer):
            hs = layer(hs, context)
        elif isinstance(layer, TemporalTransformer):
            hs = hs + gate * layer(hs, frames)
        elif isinstance(layer, Upsample):
            hs = layer(hs, size)
        else:
            raise TypeError(f"unexpected layer {type(layer).__name__} in UNet block")
    return hs
