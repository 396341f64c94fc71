"""Per-step metrics: `OUTPUT/metrics.jsonl`, TensorBoard scalars, a console line, MFU on GPUs."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

# Dense bf16 peak FLOP/s per device (vendor datasheets, no sparsity); MFU is reported only for these.
PEAK_BF16_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "H800": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "B200": 2250e12,
    "GH200": 989e12,
}

# Slots of the one all_reduce per step (SUM over ranks).
_FIELDS = (
    "loss_image",
    "n_image",
    "loss_video",
    "n_video",
    "samples_image",
    "samples_video",
    "wait",
    "step_time",
    "stop",
    "flops",
    "bad",
    "nonfinite_image",
    "nonfinite_video",
    "not_applied",
)


def reduce_step(
    role: str,
    loss: float,
    samples: int,
    wait_s: float,
    step_s: float,
    stop: bool,
    device: torch.device,
    flops: float = 0.0,
    bad: int = 0,
    applied: bool = True,
) -> dict[str, Any]:
    """Role-averaged losses, global sample counts, mean data wait, summed FLOPs and skipped
    samples; `stop` if any rank wants to stop; how many ranks saw a non-finite loss and how many
    had their optimiser step discarded. One all_reduce per step.

    A role without ranks has loss None (null in JSON); a non-finite loss stays NaN (`NaN`)."""
    v = dict.fromkeys(_FIELDS, 0.0)
    v[f"loss_{role}"], v[f"n_{role}"], v[f"samples_{role}"] = loss, 1.0, float(samples)
    v["wait"], v["step_time"], v["stop"] = wait_s, step_s, float(stop)
    v["flops"], v["bad"] = flops, float(bad)
    # A NaN slot would poison the sum of the other slots: losses travel as 0 plus a flag.
    if not math.isfinite(loss):
        v[f"loss_{role}"] = 0.0
    v[f"nonfinite_{role}"], v["not_applied"] = float(not math.isfinite(loss)), float(not applied)
    t = torch.tensor([v[k] for k in _FIELDS], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    s = dict(zip(_FIELDS, t.tolist()))
    world = dist.get_world_size() if dist.is_initialized() else 1
    step_time = s["step_time"] / world
    nan = float("nan")
    role_loss = {}
    for r in ("image", "video"):
        if not s[f"n_{r}"]:
            role_loss[r] = None
        else:
            role_loss[r] = nan if s[f"nonfinite_{r}"] else s[f"loss_{r}"] / s[f"n_{r}"]
    return {
        "loss_image": role_loss["image"],
        "loss_video": role_loss["video"],
        "samples_image": s["samples_image"],
        "samples_video": s["samples_video"],
        "step_time": step_time,
        "data_wait_fraction": s["wait"] / s["step_time"] if s["step_time"] else 0.0,
        "stop": s["stop"] > 0,
        "flops": s["flops"],
        "bad": int(s["bad"]),
        "nonfinite_ranks": int(s["nonfinite_image"] + s["nonfinite_video"]),
        "not_applied_ranks": int(s["not_applied"]),
    }



def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    hits = [v for k, v in PEAK_BF16_FLOPS.items() if k in name]
    return max(hits) if hits else None


def count_train_flops(fn) -> float:
    """FLOPs of one forward+backward (`fn` runs it), counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


class MetricsLog:
    """Rank 0 writes; other ranks hold a no-op instance."""

    def __init__(self, output: str | Path, enabled: bool, tensorboard: bool, log_every: int):
        self.enabled, self.log_every = enabled, log_every
        self.file = self.writer = None
        self.t0 = time.time()
        if not enabled:
            return
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        self.file = open(out / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        # None (a role without ranks) is null; NaN/inf are written as JSON's common extension
        # `NaN`/`Infinity` (Python's json, pandas, JavaScript's JSON5 read them), never as null.
        self.file.write(json.dumps(record, allow_nan=True) + "\n")
        step = record["step"]
        if self.writer is not None:
            for key, value in record.items():  # NaN too: a diverging run must show in TensorBoard
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(_tb_name(key), value, step)
        if step % self.log_every == 0 or step == 1 or record.get("skipped"):
            mfu = f" mfu {record['mfu']:.1%}" if record.get("mfu") is not None else ""
            skipped = " (step skipped)" if record.get("skipped") else ""
            print(
                f"step {step} | loss img {_num(record['loss_image'])} vid {_num(record['loss_video'])} | "
                f"lr {record['lr']:.2e} | gnorm {record['grad_norm']:.3f}{skipped} | "
                f"{record['samples_per_s']:.1f} samples/s | wait {record['data_wait_fraction']:.1%} | "
                f"{record['step_time']:.2f}s/step{mfu}",
                flush=True,
            )

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.writer:
            self.writer.close()


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"  # NaN prints as nan


def _tb_name(key: str) -> str:
    groups = {"loss_": "loss/", "samples_per_s": "throughput/", "grad_norm": "optim/", "lr": "optim/"}
    for prefix, group in groups.items():
        if key.startswith(prefix):
            return group + key
    return "perf/" + key
