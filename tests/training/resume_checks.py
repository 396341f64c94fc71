"""Run under the real `deepspeed` launcher (2 CPU ranks: video + image) by test_resume_features.py.

One launch, many engines (every launch costs tens of seconds): each scenario trains, saves,
builds a fresh Trainer that resumes, and leaves metrics.jsonl / dumps for the test to compare.
Before every resume the process-global RNGs are scrambled, so state the checkpoint forgot shows.

- zero1: GA 2 + warmup 3, resumed mid-warmup at step 2.
- zero2: EMA 0.5 and 2 loader workers; resumed exactly, with another lr, with 1 and 0 workers.
- zero3: resumed at step 2; its save at step 4 fails on rank 1 (disk full, injected here).
- nan: rank 1's loss is NaN at steps 2 and 5, rank 0's gradient inf at 4 (train.max_skipped_steps=2).
- universal: the 4-rank baseline's step 5 on 2 ranks, twice from the same conversion.
- untrusted: --resume of a checkpoint outside --output without trust_checkpoint.
"""

from __future__ import annotations

import argparse
import errno
import json
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine  # noqa: E402
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state  # noqa: E402

from core.config import load_config  # noqa: E402
from training.checkpoint import CheckpointSaveError, UntrustedCheckpointError  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.guard import NonFiniteLossError  # noqa: E402
from training.loop import Trainer  # noqa: E402

TINY = Path(__file__).resolve().parents[2] / "configs" / "train" / "tiny.yaml"
BASE = ["train.resume=none", "train.tensorboard=false", "data.num_workers=0", "roles.image_ranks=1"]


def trainer(data: str, out: Path, *overrides: str) -> Trainer:
    cfg = load_config(TrainConfig, TINY, [*BASE, *overrides])
    return Trainer(cfg, data, str(out)).setup()


def steps(tr: Trainer, n: int, after=None) -> None:
    """`n` training steps as `Trainer.run` does them, with a hook after each."""
    for _ in range(n):
        record = tr.train_step()
        record.pop("stop")
        tr.metrics.log(record)
        tr.guard.check()
        if after is not None:
            after(tr)
    tr.loader.close()
    tr.metrics.close()


def copy_ckpt(src_out: Path, step: int, dst_out: Path) -> None:
    """The checkpoint of step `step` into a fresh output (resumed with `--resume auto`)."""
    if dist.get_rank() == 0:
        name = f"step_{step:07d}"
        (dst_out / "checkpoints").mkdir(parents=True)
        shutil.copytree(src_out / "checkpoints" / name, dst_out / "checkpoints" / name)
    dist.barrier()
    scramble()


def scramble() -> None:
    random.seed(12345)
    np.random.seed(12345)
    torch.manual_seed(12345)


def params(tr: Trainer) -> dict[str, torch.Tensor]:
    return {n: safe_get_full_fp32_param(p).detach().clone() for n, p in tr.engine.module.named_parameters()}


def zero1(data: str, out: Path) -> None:
    extra = ["deepspeed.zero_stage=1", "deepspeed.gradient_accumulation_steps=2", "optim.warmup_steps=3"]
    optimizer_steps = {}
    for name in ("a", "b"):  # a: 4 steps, saves at 2 and 4; b: resumes at 2
        if name == "b":
            copy_ckpt(out / "a", 2, out / "b")
        tr = trainer(data, out / name, *extra, *(["train.resume=auto"] if name == "b" else []))
        tr.run(max_steps=4)
        optimizer_steps[name] = tr.engine.global_steps
    if tr.rank == 0:
        (out / "optimizer_steps.json").write_text(json.dumps(optimizer_steps))


def zero2(data: str, out: Path) -> None:
    extra = ["optim.ema_decay=0.5", "data.num_workers=2"]
    tr, trace = trainer(data, out / "a", *extra), []

    def record(t: Trainer) -> None:
        trace.append(params(t))
        if t.step == 2:
            t.save()

    trace.append(params(tr))  # the initial weights: EMA starts from them
    steps(tr, 4, record)
    if tr.rank == 0:
        torch.save({"params": trace, "ema": tr.ema.state_dict()}, out / "a_trace.pt")
    for name, more in (
        ("b", []),
        ("lr", ["optim.lr=1.0e-3"]),
        ("w1", ["data.num_workers=1"]),
        ("w0", ["data.num_workers=0"]),
    ):
        copy_ckpt(out / "a", 2, out / name)
        tr = trainer(data, out / name, *extra, *more, "train.resume=auto")
        steps(tr, 2 if name in ("b", "lr") else 1)
        if tr.rank == 0:
            gens = sorted({int(p["generation"]) for p in tr.loader.positions.values()})
            state = {"ema": tr.ema.state_dict(), "generations": gens}
            state["lr_groups"] = [g["lr"] for g in tr.engine.optimizer.param_groups]
            torch.save(state, out / f"{name}_state.pt")


def zero3(data: str, out: Path) -> None:
    tr = trainer(data, out / "a", "deepspeed.zero_stage=3")
    tr.run(max_steps=4)
    copy_ckpt(out / "a", 2, out / "b")
    tr = trainer(data, out / "b", "deepspeed.zero_stage=3", "train.resume=auto")
    original = TorchCheckpointEngine.save

    def disk_full(self, state_dict, path):  # rank 1 only, the step-4 save only
        if "step_0000004" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return original(self, state_dict, path)

    if tr.rank == 1:
        TorchCheckpointEngine.save = disk_full
    try:
        tr.run(max_steps=4)
        outcome = "no error"
    except CheckpointSaveError as err:
        outcome = str(err)
    finally:
        TorchCheckpointEngine.save = original
    (out / f"b_fault_rank{tr.rank}.txt").write_text(outcome)
    dist.barrier()


def nan(data: str, out: Path) -> None:
    tr, trace = trainer(data, out / "a", "train.max_skipped_steps=2"), []
    inner = tr.compute_loss

    def poisoned(batch):
        loss = inner(batch)
        return loss * float("nan") if tr.rank == 1 and tr.step + 1 in (2, 5) else loss

    tr.compute_loss = poisoned
    if tr.rank == 0:  # step 4: finite losses, but an infinite gradient on rank 0
        first = next(p for p in tr.engine.module.parameters() if p.requires_grad)
        first.register_hook(lambda g: g * float("inf") if tr.step + 1 == 4 else g)
    try:
        steps(tr, 6, lambda t: trace.append(params(t)))
        outcome = "no error"
    except NonFiniteLossError as err:
        outcome = str(err)
    (out / f"a_stop_rank{tr.rank}.txt").write_text(outcome)
    if tr.rank == 0:
        torch.save(trace, out / "a_trace.pt")
    dist.barrier()


def universal(data: str, out: Path, source: Path) -> None:
    if dist.get_rank() == 0:
        (out / "u1" / "checkpoints").mkdir(parents=True)
        shutil.copytree(source, out / "u1" / "checkpoints" / source.name)
    dist.barrier()
    tr = trainer(data, out / "u1", "train.resume=auto")
    groups = tr.engine.optimizer.optimizer.state.values()
    dump = {
        "params": params(tr),
        "exp_avg": {},
        "exp_avg_sq": {},
        "optimizer_steps": sorted({int(s["step"]) for s in groups}),
        "trainer_step": tr.step,
        "scheduler_epoch": tr.engine.lr_scheduler.last_epoch,
        "global_steps": tr.engine.global_steps,
    }
    for n, p in tr.engine.module.named_parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            dump[key][n] = safe_get_full_optimizer_state(p, key).detach().clone()
    if tr.rank == 0:
        torch.save(dump, out / "u1_state.pt")
    steps(tr, 2)
    copy_ckpt(out / "u1", 5, out / "u2")  # with the universal/ folder u1's resume converted
    tr = trainer(data, out / "u2", "train.resume=auto")
    steps(tr, 2)


def untrusted(data: str, out: Path) -> None:
    try:
        trainer(data, out / "own", f"train.resume={out / 'zero3' / 'a' / 'checkpoints' / 'step_0000002'}")
        outcome = "loaded"
    except UntrustedCheckpointError as err:
        outcome = str(err)
    (out / f"untrusted_rank{dist.get_rank()}.txt").write_text(outcome)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--universal", required=True, help="a 4-rank checkpoint directory")
    p.add_argument("--local_rank", type=int)
    args = p.parse_args()
    out = Path(args.out)
    BASE.append("train.save_every=2")
    for name, fn in (("zero1", zero1), ("zero2", zero2), ("zero3", zero3), ("nan", nan)):
        (out / name).mkdir(parents=True, exist_ok=True)
        fn(args.data, out / name)
    universal(args.data, out, Path(args.universal))
    untrusted(args.data, out)
    dist.barrier()
    if dist.get_rank() == 0:
        (out / "done").write_text("ok")


if __name__ == "__main__":
    main()
