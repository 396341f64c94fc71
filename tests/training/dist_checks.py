"""Run under the real `deepspeed` launcher by test_distributed.py: one launch, many engines.

For each ZeRO stage: one micro-step on every rank, dump each rank's inputs (batch, text tokens,
RNG state) and the full averaged gradients (`safe_get_full_grad`, a collective), then two more
training steps (no hang). For each gradient-decay mode (ZeRO-2): train two steps from the same
start and dump the final fp32 parameters. test_distributed.py recomputes all of it in one
process without DeepSpeed and compares.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad  # noqa: E402

from core.config import load_config  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.loop import Trainer  # noqa: E402

TINY = Path(__file__).resolve().parents[2] / "configs" / "train" / "tiny.yaml"


INIT: list[str] = []  # model.init=PATH: random weights without zero-init layers (see conftest)


def trainer(data: str, out: Path, *overrides: str) -> Trainer:
    base = ["train.resume=none", "train.tensorboard=false", "data.num_workers=0", *INIT]
    cfg = load_config(TrainConfig, TINY, [*base, *overrides])
    return Trainer(cfg, data, str(out)).setup()


def grads_check(data: str, out: Path, stage: int) -> None:
    tr = trainer(data, out / f"zero{stage}", f"deepspeed.zero_stage={stage}")
    batch = next(tr.loader)
    dump = {
        "role": tr.role.role,
        "generator": tr.generator.get_state(),
        "context": tr.context(batch),
        **{k: v for k, v in batch.items() if torch.is_tensor(v)},
    }
    torch.save(dump, out / f"zero{stage}" / f"inputs_rank{tr.rank}.pt")
    loss = tr.forward_backward(batch)
    grads = {n: safe_get_full_grad(p) for n, p in tr.engine.module.named_parameters()}
    if tr.rank == 0:
        torch.save({n: g.detach().float().cpu() for n, g in grads.items()}, out / f"zero{stage}" / "grads.pt")
    torch.save({"loss": loss}, out / f"zero{stage}" / f"loss_rank{tr.rank}.pt")
    tr.engine.step()
    for _ in range(2):
        tr.train_step()
    dist.barrier()


def decay_check(data: str, out: Path, mode: str) -> None:
    # AdamW ignores a constant gradient scale except through epsilon and global-norm clipping
    # (docs/method.md#decay): both are off so that only the decay mode itself can move the update.
    tr = trainer(
        data, out / f"decay_{mode}", f"optim.grad_decay_mode={mode}", "optim.eps=1.0e-30", "optim.grad_clip=0"
    )
    for _ in range(2):
        tr.train_step()
    params = {n: safe_get_full_fp32_param(p) for n, p in tr.engine.module.named_parameters()}
    if tr.rank == 0:
        torch.save(
            {n: p.detach().float().cpu() for n, p in params.items()}, out / f"decay_{mode}" / "params.pt"
        )
    dist.barrier()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--init", required=True)
    p.add_argument("--local_rank", type=int)
    args = p.parse_args()
    INIT.append(f"model.init={args.init}")
    out = Path(args.out)
    for stage in (1, 2, 3):
        grads_check(args.data, out, stage)
    for mode in ("none", "all", "video_ranks"):
        decay_check(args.data, out, mode)
    if dist.get_rank() == 0:
        (out / "done").write_text("ok")


if __name__ == "__main__":
    main()
