"""Evaluation as the paper reports it (docs/method.md#eval): the command line.

    python -m model.evaluate --ckpt DIR --prompts FILE [--clip tiny|ARCH:TAG] [--sweep]
        [--motions 300,600] [--appearances 0,0.5,1] [--real MANIFEST_or_VIDEOS] [--out DIR]
        [--trust-checkpoint] [--config FILE] [overrides...]

CLIPSIM and temporal consistency of generated videos, averaged over prompts; with `--sweep`,
shaped like the paper's Fig. 8 (γm at the config's γa, then γa at the config's γm; without
`--motions` the γm levels span the checkpoint's training 10th-90th percentiles). `--real`
scores real clips (a manifest with `video` and optional `caption` columns, a folder of videos,
or one video) as the reference row. Writes `metrics.csv`, `metrics.md` and, with `--sweep`,
`sweep.png`.

The scoring is model/clip_metrics.py, the files model/eval_io.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model import clip_metrics, eval_io

if TYPE_CHECKING:
    from model.sampler import Sampler

APPEARANCE_SWEEP = (0.0, 0.5, 1.0)


def build_parser() -> argparse.ArgumentParser:
    from model.sample import add_trust_flag

    p = argparse.ArgumentParser(prog="python -m model.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="as for model.sample (optional with --real alone)")
    p.add_argument("--prompts", help="prompts, one a line")
    p.add_argument("--clip", default="ViT-H-14:laion2b_s32b_b79k", help="open_clip model: tiny or ARCH:TAG")
    p.add_argument("--sweep", action="store_true", help="sweep γm and γa (paper Fig. 8)")
    p.add_argument("--motions", help="γm values of the sweep (default: 4 levels over the training "
                                     "10th-90th percentiles, or 300,400,500,600 without statistics)")
    p.add_argument("--appearances", default=",".join(f"{a:g}" for a in APPEARANCE_SWEEP),
                   help="γa values of the sweep")
    p.add_argument("--real", help="real clips for the reference row: manifest, folder or video")
    p.add_argument("--out", default="eval", help="output directory (metrics.csv, metrics.md, sweep.png)")
    p.add_argument("--config", help="YAML sample config (configs/sample/*.yaml)")
    p.add_argument("--steps", type=int, help="denoising steps (overrides the config)")
    add_trust_flag(p)
    p.add_argument("overrides", nargs="*", help="sample config overrides field=value")
    return p


def _floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise ValueError(f"{flag} {text!r}: expected comma-separated numbers") from exc


def default_motions(sampler: Sampler) -> tuple[float, ...]:
    """4 γm levels over the training 10th-90th percentiles (the paper's 300-600 without them)."""
    stats = sampler.calibration.stats
    if stats is None:
        return (300.0, 400.0, 500.0, 600.0)
    lo, hi = stats.motion["p10"], stats.motion["p90"]
    return tuple(lo + (hi - lo) * i / 3 for i in range(4))


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from model.checkpoint_io import load_for_sampling
    from model.sample import config_from_args
    from model.sample_config import check_appearance_factor, check_motion_factor
    from model.sample_io import read_prompts
    from model.sampler import Sampler

    if not args.ckpt and not args.real:
        raise ValueError("pass --ckpt with --prompts (generated videos) and/or --real (reference clips)")
    if bool(args.ckpt) != bool(args.prompts):
        raise ValueError("--ckpt and --prompts go together")
    cfg = config_from_args(args, ("steps",))
    motions = _floats(args.motions, "--motions") if args.motions else None
    appearances = _floats(args.appearances, "--appearances")
    for m in motions or ():  # fail before loading or generating anything
        check_motion_factor(m, "--motions")
    for a in appearances:
        check_appearance_factor(a, "--appearances")
    prompts = read_prompts(None, args.prompts) if args.prompts else []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scorer = clip_metrics.ClipScorer(args.clip)
    rows, frames = [], cfg.frames or 32
    if args.ckpt:
        sampler = Sampler(load_for_sampling(args.ckpt, trust_checkpoint=args.trust_checkpoint), cfg)
        frames = sampler.frames
        grid = clip_metrics.sweep_settings(sampler.default_motion, cfg.appearance_factor, args.sweep,
                                           motions or default_motions(sampler), appearances)
        rows += clip_metrics.score_generated(sampler, scorer, prompts, grid)
    if args.real:
        rows.append(clip_metrics.score_real(scorer, args.real, frames, cfg.fps))
    eval_io.write_table(rows, out)
    if args.sweep and args.ckpt:
        eval_io.plot_sweep(rows, out)
    return rows


def main(argv: list[str] | None = None) -> int:
    from core.config import ConfigError
    from model.checkpoint_io import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        rows = run(args)
    except (ConfigError, CheckpointError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print((Path(args.out) / "metrics.md").read_text())
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
