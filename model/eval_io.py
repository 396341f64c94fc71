"""Files of `python -m model.evaluate`: real clips in (a manifest, a folder or one video), the
metrics table (`metrics.csv`, `metrics.md`) and the Fig. 8 plot (`sweep.png`) out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".gif")
COLUMNS = ["setting", "motion_factor", "appearance_factor", "temporal_consistency", "clipsim", "n", "skipped"]


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


def write_table(rows: list[dict[str, Any]], out: Path) -> None:
    import pandas as pd

    table = pd.DataFrame(rows, columns=COLUMNS)
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
    for ax, label, key, name in ((axes[0], "motion sweep", "motion_factor", "motion factor γm"),
                                 (axes[1], "appearance sweep", "appearance_factor", "appearance factor γa")):
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
