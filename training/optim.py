"""Optimiser, DeepSpeed config, the 0.2 spatial gradient decay and EMA weights (docs/method.md#decay)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from training.config import TrainConfig


def resolve_precision(cfg: TrainConfig) -> str:
    """bf16 only where the hardware has it (CUDA with bf16 support); fp32 elsewhere (CPU)."""
    if cfg.deepspeed.precision != "auto":
        if cfg.deepspeed.precision == "bf16" and not (
            torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        ):
            raise ValueError(
                "config field 'deepspeed.precision': bf16 asked for but this device has no bf16 "
                "support; use auto or fp32"
            )
        return cfg.deepspeed.precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def deepspeed_config(
    cfg: TrainConfig, micro_batch: int, precision: str, load_universal: bool
) -> dict[str, Any]:
    ds: dict[str, Any] = {
        # Only used by DeepSpeed's throughput bookkeeping: each role feeds its own micro-batch.
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": cfg.deepspeed.gradient_accumulation_steps,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        # The non-finite guard (training/loop.py) relies on DeepSpeed discarding a step whose
        # global gradient norm is inf/NaN; set explicitly, bf16's default changed over versions.
        "bf16": {"enabled": precision == "bf16", "check_grad_overflow": True},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
    }
    return _merge(ds, cfg.deepspeed.config)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    fused = torch.cuda.is_available()
    return torch.optim.AdamW(
        params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay, fused=fused or None
    )


def make_scheduler(cfg: TrainConfig):
    """Linear warmup over `optim.warmup_steps`, then constant; DeepSpeed checkpoints its state."""
    warmup = cfg.optim.warmup_steps

    def build(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0
        )

    return build


def apply_optim_config(scheduler, cfg: TrainConfig) -> None:
    """After loading a checkpoint: the config, not the checkpoint, sets the hyper-parameters
    (lr schedule, betas, eps, weight decay), so a run can be resumed with a lower lr. With an
    unchanged config this is a no-op and resuming stays exact."""
    o = cfg.optim
    scheduler.base_lrs = [o.lr for _ in scheduler.base_lrs]
    lrs = [o.lr * fn(scheduler.last_epoch) for fn in scheduler.lr_lambdas]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group.update(lr=lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    scheduler._last_lr = lrs


def install_grad_decay(model: nn.Module, spatial: list[str], factor: float, mode: str, is_video_rank: bool):
    """Scale this rank's gradient of the spatial (pretrained) parameters by `factor`.

    A tensor hook runs when autograd produces the parameter's gradient, before DeepSpeed's
    accumulate/reduce hooks, so it scales this rank's contribution to the averaged gradient
    under every ZeRO stage. `video_ranks` (docs/method.md#decay): only video ranks' contribution,
    so the image objective dominates the spatial layers. `all`: every rank (released code;
    AdamW makes it nearly a no-op). `none`: no hook.
    """
    if mode == "none" or factor == 1.0 or (mode == "video_ranks" and not is_video_rank):
        return []
    wanted = set(spatial)
    return [
        p.register_hook(lambda g, f=factor: g * f)
        for n, p in model.named_parameters()
        if n in wanted and p.requires_grad
    ]


class EMA:
    """Exponential moving average of the parameters in fp32 (ZeRO stage 1/2: full params per rank)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            self.shadow[n].lerp_(p.detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: t.cpu() for n, t in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for n, t in state.items():
            self.shadow[n].copy_(t)
