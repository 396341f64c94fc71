"""Train HiGen with DeepSpeed (docs/training.md).

    deepspeed [--hostfile H | --num_gpus N] training/train.py --config FILE --data OUT --output DIR \
        [--max-steps N] [--save-every N] [--resume auto|PATH|none] [--trust-checkpoint] \
        [section.field=value ...]

`python training/train.py ...` runs a single process. Exit status 143 means SIGTERM stopped the
job after writing a complete checkpoint (relaunch with `--resume auto`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (the deepspeed launcher does this)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (configs/train/tiny.yaml, configs/train/default.yaml)")
    p.add_argument("--data", required=True, help="preprocessing output root (local path or fsspec URL)")
    p.add_argument("--output", required=True, help="run directory: checkpoints, metrics, config.yaml")
    p.add_argument("--max-steps", type=int, help="overrides train.max_steps")
    p.add_argument("--save-every", type=int, help="overrides train.save_every")
    p.add_argument("--resume", help="auto (newest complete checkpoint), none, or a checkpoint directory")
    p.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="allow --resume from a DeepSpeed checkpoint outside --output (DeepSpeed unpickles it)",
    )
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="section.field=value config overrides")
    return p.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    from core.config import load_config
    from training.config import TrainConfig
    from training.loop import Trainer

    args = parse_args(argv)
    overrides = list(args.overrides)
    for flag, key in (
        (args.max_steps, "max_steps"),
        (args.save_every, "save_every"),
        (args.resume, "resume"),
    ):
        if flag is not None:
            overrides.append(f"train.{key}={flag}")
    if args.trust_checkpoint:
        overrides.append("train.trust_checkpoint=true")
    cfg = load_config(TrainConfig, args.config, overrides)
    return Trainer(cfg, args.data, args.output).setup().run()


if __name__ == "__main__":
    sys.exit(main())
