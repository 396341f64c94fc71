"""Scoring videos as the paper reports it (docs/method.md#eval): CLIPSIM and temporal consistency of
generated and real clips, and the Fig. 8 sweep over γm and γa. The CLI is model/evaluate.py;
reading real clips and writing tables and plots is model/eval_io.py.

- CLIPSIM: mean cosine similarity of the prompt's CLIP text embedding and each frame's CLIP
  image embedding.
- Temporal consistency: mean CLIP cosine similarity of consecutive frames.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import torch

from core.encoders import load_clip
from model import eval_io


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


def score_real(scorer: ClipScorer, spec: str, frames: int, target_fps: float) -> dict[str, Any]:
    """The reference row: metrics of real clips. Unreadable clips are counted, not fatal."""
    rows, skipped = [], 0
    for video, caption in eval_io.real_clips(spec):
        try:
            rows.append(scorer.score(eval_io.sample_real_frames(video, frames, target_fps), caption))
        except Exception as exc:  # decord raises its own error types
            skipped += 1
            print(f"evaluate: skipping real clip {video}: {exc}", file=sys.stderr)
    if not rows:
        raise ValueError(f"--real {spec}: no readable clip with at least {frames} frames")
    return {"setting": "real clips", "motion_factor": float("nan"), "appearance_factor": float("nan"),
            **mean_scores(rows), "n": len(rows), "skipped": skipped}


def mean_scores(rows: list[dict[str, float]]) -> dict[str, float]:
    out = {}
    for k in ("clipsim", "temporal_consistency"):
        values = np.array([r[k] for r in rows], dtype=np.float64)
        out[k] = float(values[np.isfinite(values)].mean()) if np.isfinite(values).any() else float("nan")
    return out



# -- generated videos ---------------------------------------------------------------------------


def sweep_settings(motion_factor: float, appearance_factor: float, sweep: bool, motions: tuple[float, ...],
                   appearances: tuple[float, ...]) -> list[tuple]:
    """(label, γm, γa): the one setting, or the Fig. 8 sweeps (γm at the given γa, then γa at the
    given γm)."""
    if not sweep:
        return [("config", motion_factor, appearance_factor)]
    return ([("motion sweep", float(m), appearance_factor) for m in motions]
            + [("appearance sweep", motion_factor, float(a)) for a in appearances])


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
        for motion_factor, appearance_factor in unique:
            latents, _ = sampler.generate(batch, cfg.seed + k, prior=prior, motion_factor=motion_factor,
                                          appearance_factor=appearance_factor)
            for frames, prompt in zip(sampler.decode(latents), batch):
                scores[(motion_factor, appearance_factor)].append(scorer.score(frames, prompt))
    return [{"setting": label, "motion_factor": m, "appearance_factor": a, **mean_scores(scores[(m, a)]),
             "n": len(scores[(m, a)]), "skipped": 0} for label, m, a in grid]
