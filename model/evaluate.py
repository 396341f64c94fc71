"""Evaluation as the paper reports it (SPEC §7): CLIPSIM and temporal consistency, with a sweep
over the motion and appearance factors shaped like the paper's Fig. 8.

    python -m model.evaluate --ckpt DIR --prompts FILE [--clip tiny|ARCH:TAG] [--sweep]
        [--real MANIFEST_or_VIDEOS] [--out DIR] [--config FILE] [overrides...]

- CLIPSIM: mean cosine similarity of the prompt's CLIP text embedding and each frame's CLIP
  image embedding.
- Temporal consistency: mean CLIP cosine similarity of consecutive frames.
Both averaged over prompts. `--real` scores real clips (a manifest with `video` and optional
`caption` columns, a folder of videos, or one video) as the reference row. Writes
`metrics.csv`, `metrics.md` and, with `--sweep`, `sweep.png`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.encoders import load_clip

MOTION_SWEEP = (300.0, 400.0, 500.0, 600.0)
APPEARANCE_SWEEP = (0.0, 0.5, 1.0)
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".gif")


class ClipScorer:
    """open_clip embeddings of frames and prompts, and the two metrics built from them."""

    def __init__(self, spec: str = "ViT-H-14:laion2b_s32b_b79k", device: str | torch.device = "cpu"):
        import open_clip

        self.model, self.tokenizer, size = load_clip(spec, device)
        self.device = device
        self.preprocess = open_clip.image_transform(size, is_train=False)

    @torch.no_grad()
    def frame_features(self, frames: np.ndarray, batch: int = 64) -> torch.Tensor:
        """uint8 [F,H,W,3] -> L2-normalised [F,D]."""
        from PIL import Image

        feats = []
        for start in range(0, len(frames), batch):
            x = torch.stack([self.preprocess(Image.fromarray(f)) for f in frames[start : start + batch]])
            feats.append(self.model.encode_image(x.to(self.device), normalize=True).float().cpu())
        return torch.cat(feats)

    @torch.no_grad()
    def text_features(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(prompts)).to(self.device)
        return self.model.encode_text(tokens, normalize=True).float().cpu()

    def score(self, frames: np.ndarray, prompt: str | None) -> dict[str, float]:
        feats = self.frame_features(frames)
        out = {"temporal_consistency": temporal_consistency(feats), "clipsim": float("nan")}
        if prompt:
            out["clipsim"] = clipsim(feats, self.text_features([prompt])[0])
        return out


def temporal_consistency(frame_features: torch.Tensor) -> float:
    """Mean cosine similarity of consecutive frames' (normalised) features [F,D]."""
    if len(frame_features) < 2:
        raise ValueError(f"temporal consistency needs at least 2 frames, got {len(frame_features)}")
    return float((frame_features[:-1] * frame_features[1:]).sum(-1).mean())


def clipsim(frame_features: torch.Tensor, text_feature: torch.Tensor) -> float:
    """Mean cosine similarity of each frame's features [F,D] with the text features [D]."""
    return float((frame_features @ text_feature).mean())


# -- real clips (reference row) ---------------------------------------------------------------


def real_clips(spec: str) -> list[tuple[str, str | None]]:
    """(video path, caption or None) from a manifest (parquet/csv/jsonl), a folder or a file."""
    import pandas as pd

    path = Path(spec)
    if path.is_dir():
        videos = sorted(p for p in path.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES)
        return [(str(v), None) for v in videos]
    if path.suffix.lower() in VIDEO_SUFFIXES and path.is_file():
        return [(str(path), None)]
    readers = {".parquet": pd.read_parquet, ".csv": pd.read_csv,
               ".jsonl": lambda p: pd.read_json(p, lines=True)}
    if path.suffix.lower() not in readers or not path.is_file():
        raise ValueError(f"--real {spec}: expected a manifest (.parquet/.csv/.jsonl with a 'video' column), "
                         "a folder of videos or a video file")
    table = readers[path.suffix.lower()](path)
    if "video" not in table.columns:
        raise ValueError(f"--real {spec}: manifest has no 'video' column (columns: {list(table.columns)})")
    out = []
    for video, caption in zip(table["video"], table.get("caption", [None] * len(table))):
        video = str(video)
        if not Path(video).is_absolute() and not Path(video).exists():
            video = str(path.parent / video)
        out.append((video, caption if isinstance(caption, str) and caption else None))
    return out


def sample_real_frames(path: str, frames: int, target_fps: float) -> np.ndarray:
    """F frames of a real video at the model's frame rate, chosen as preprocessing chooses them."""
    import decord

    from core.geometry import select_frames
    from core.shard_format import sample_key

    reader = decord.VideoReader(path)
    indices, _ = select_frames(len(reader), float(reader.get_avg_fps()), target_fps, frames, sample_key(path))
    return reader.get_batch(indices).asnumpy()


def score_real(scorer: ClipScorer, spec: str, frames: int, target_fps: float) -> dict[str, Any]:
    """The reference row: metrics of real clips. Unreadable clips are counted, not fatal."""
    rows, skipped = [], 0
    for video, caption in real_clips(spec):
        try:
            rows.append(scorer.score(sample_real_frames(video, frames, target_fps), caption))
        except Exception as exc:  # decord raises its own error types
            skipped += 1
            print(f"evaluate: skipping real clip {video}: {exc}", file=sys.stderr)
    if not rows:
        raise ValueError(f"--real {spec}: no readable clip with at least {frames} frames")
    return {"setting": "real clips", "motion": float("nan"), "appearance": float("nan"), **_mean(rows),
            "n": len(rows), "skipped": skipped}


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    out = {}
    for k in ("clipsim", "temporal_consistency"):
        values = np.array([r[k] for r in rows], dtype=np.float64)
        out[k] = float(values[np.isfinite(values)].mean()) if np.isfinite(values).any() else float("nan")
    return out


# -- generated videos ---------------------------------------------------------------------------


def settings(cfg, sweep: bool, motions: tuple[float, ...], appearances: tuple[float, ...]) -> list[tuple]:
    """(label, γm, γa): the config's one setting, or the Fig. 8 sweeps (γm at the config's γa,
    then γa at the config's γm)."""
    if not sweep:
        return [("config", cfg.motion, cfg.appearance)]
    return ([("motion sweep", float(m), cfg.appearance) for m in motions]
            + [("appearance sweep", cfg.motion, float(a)) for a in appearances])


def score_generated(sampler, scorer: ClipScorer, prompts: list[str],
                    grid: list[tuple]) -> list[dict[str, Any]]:
    """Generate every prompt under every setting and score it. Per batch, all settings share one
    spatial prior and the same stage-2 noise, so the rows differ only by γm and γa."""
    cfg = sampler.cfg
    unique = list(dict.fromkeys((m, a) for _, m, a in grid))
    scores: dict[tuple[float, float], list[dict[str, float]]] = {key: [] for key in unique}
    for k, start in enumerate(range(0, len(prompts), cfg.batch_size)):
        batch = prompts[start : start + cfg.batch_size]
        prior = sampler.spatial_prior(batch, cfg.seed + k)
        for motion, appearance in unique:
            latents, _ = sampler.generate(batch, cfg.seed + k, prior=prior, motion=motion,
                                          appearance=appearance)
            for frames, prompt in zip(sampler.decode(latents), batch):
                scores[(motion, appearance)].append(scorer.score(frames, prompt))
    return [{"setting": label, "motion": m, "appearance": a, **_mean(scores[(m, a)]),
             "n": len(scores[(m, a)]), "skipped": 0} for label, m, a in grid]


# -- outputs --------------------------------------------------------------------------------


def write_table(rows: list[dict[str, Any]], out: Path) -> None:
    import pandas as pd

    table = pd.DataFrame(rows, columns=["setting", "motion", "appearance", "temporal_consistency", "clipsim",
                                        "n", "skipped"])
    table.to_csv(out / "metrics.csv", index=False)
    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for row in table.itertuples(index=False):
        cells = [("-" if np.isnan(v) else f"{v:.4g}") if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    (out / "metrics.md").write_text("\n".join(lines) + "\n")


def plot_sweep(rows: list[dict[str, Any]], out: Path) -> Path:
    """Paper Fig. 8: temporal consistency and CLIPSIM against γm (left) and γa (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    real = next((r for r in rows if r["setting"] == "real clips"), None)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, label, key, name in ((axes[0], "motion sweep", "motion", "motion factor γm"),
                                 (axes[1], "appearance sweep", "appearance", "appearance factor γa")):
        part = [r for r in rows if r["setting"] == label]
        x = [r[key] for r in part]
        ax.plot(x, [r["temporal_consistency"] for r in part], "o-", color="#4477aa",
                label="temporal consistency")
        ax.set_xlabel(name)
        ax.set_ylabel("temporal consistency", color="#4477aa")
        twin = ax.twinx()
        twin.plot(x, [r["clipsim"] for r in part], "s--", color="#aa3377", label="CLIPSIM")
        twin.set_ylabel("CLIPSIM", color="#aa3377")
        if real is not None:
            ax.axhline(real["temporal_consistency"], color="#4477aa", lw=0.8, ls=":", label="real clips")
            if np.isfinite(real["clipsim"]):
                twin.axhline(real["clipsim"], color="#aa3377", lw=0.8, ls=":")
        handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        ax.legend(handles=handles, loc="lower left", fontsize=8)
    fig.tight_layout()
    path = out / "sweep.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="as for model.sample (optional with --real alone)")
    p.add_argument("--prompts", help="prompts, one a line")
    p.add_argument("--clip", default="ViT-H-14:laion2b_s32b_b79k", help="open_clip model: tiny or ARCH:TAG")
    p.add_argument("--sweep", action="store_true", help="sweep γm and γa (paper Fig. 8)")
    p.add_argument("--motions", default=",".join(f"{m:g}" for m in MOTION_SWEEP),
                   help="γm values of the sweep")
    p.add_argument("--appearances", default=",".join(f"{a:g}" for a in APPEARANCE_SWEEP),
                   help="γa values of the sweep")
    p.add_argument("--real", help="real clips for the reference row: manifest, folder or video")
    p.add_argument("--out", default="eval", help="output directory (metrics.csv, metrics.md, sweep.png)")
    p.add_argument("--config", help="YAML sample config (configs/sample/*.yaml)")
    p.add_argument("--steps", type=int, help="denoising steps (overrides the config)")
    p.add_argument("overrides", nargs="*", help="sample config overrides field=value")
    return p


def _floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise ValueError(f"{flag} {text!r}: expected comma-separated numbers") from exc


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from model.checkpoint_io import load_for_sampling
    from model.sample import SampleConfig, Sampler, config_from_args, read_prompts

    if not args.ckpt and not args.real:
        raise ValueError("pass --ckpt with --prompts (generated videos) and/or --real (reference clips)")
    if bool(args.ckpt) != bool(args.prompts):
        raise ValueError("--ckpt and --prompts go together")
    cfg: SampleConfig = config_from_args(args, ("steps",))
    motions, appearances = _floats(args.motions, "--motions"), _floats(args.appearances, "--appearances")
    grid = settings(cfg, args.sweep, motions, appearances)
    for _, m, a in grid:  # fail before loading or generating anything
        SampleConfig(motion=m, appearance=a)
    prompts = read_prompts(None, args.prompts) if args.prompts else []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scorer = ClipScorer(args.clip)
    rows, frames = [], cfg.frames or 32
    if args.ckpt:
        sampler = Sampler(load_for_sampling(args.ckpt), cfg)
        frames = sampler.frames
        rows += score_generated(sampler, scorer, prompts, grid)
    if args.real:
        rows.append(score_real(scorer, args.real, frames, cfg.fps))
    write_table(rows, out)
    if args.sweep and args.ckpt:
        plot_sweep(rows, out)
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
