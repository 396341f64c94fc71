"""Small shard-format-v1 datasets written from random arrays (SampleRecord + tarfile)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np

from core.shards import FORMAT_VERSION, SampleRecord, sample_key, shard_name

FRAMES, H, W = 8, 8, 16  # tiny latents: F=8 at 128x64


def dataset_json(
    frames: int = FRAMES, h: int = H, w: int = W, vae: str = "tiny", text: str | None = "tiny"
) -> dict:
    """The parts of prep's dataset.json that training reads (pipeline.runner.Finalize)."""
    size = {"width": w * 8, "height": h * 8}
    return {
        "format_version": FORMAT_VERSION,
        "output_config": {
            "video": {"frames": frames, **size},
            "image": dict(size),
            "models": {"vae": vae, "text": text},
            "format_version": FORMAT_VERSION,
        },
    }


def write_dataset_json(root: Path, **kw) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps(dataset_json(**kw)))


def record(kind: str, index: int, rng: np.random.Generator, text: bool = False, version: int | None = None):
    key = sample_key(f"{kind}-{index}")
    meta = {"source": f"{kind}-{index}"}
    if kind == "video":
        latents = rng.standard_normal((FRAMES, 4, H, W)).astype(np.float16)
        motion = rng.uniform(5, 60, FRAMES - 1).astype(np.float32)
        feats = rng.standard_normal((FRAMES, 16))
        feats /= np.linalg.norm(feats, axis=1, keepdims=True)
        rec = SampleRecord(
            key,
            f"a {kind} number {index}",
            latents,
            meta,
            motion=motion,
            appearance=(feats @ feats.T).astype(np.float32),
        )
    else:
        rec = SampleRecord(
            key, f"an {kind} number {index}", rng.standard_normal((4, H, W)).astype(np.float16), meta
        )
    if text:
        rec.text = rng.standard_normal((77, 64)).astype(np.float16)
    members = rec.members()
    if version is not None:  # rewrite the metadata with another format_version
        meta_bytes = json.dumps(dict(meta, format_version=version)).encode()
        members = [(n, meta_bytes if n.endswith(".json") else b) for n, b in members]
    return members


def write_shard(path: Path, samples: list[list[tuple[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as tar:
        for members in samples:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    path.with_suffix(".json").write_text(json.dumps({"ok": len(samples)}))


def make_dataset(
    root: Path,
    video_shards: int = 3,
    image_shards: int = 2,
    per_shard: int = 6,
    kinds: tuple[str, ...] = ("video", "image"),
    text_every: int = 2,
    version: int | None = None,
    seed: int = 0,
) -> Path:
    """`root/videos/00000N.tar|.json`, `root/images/...`; every `text_every`-th sample has text tokens."""
    rng = np.random.default_rng(seed)
    write_dataset_json(root)
    counts = {"video": video_shards, "image": image_shards}
    for kind in kinds:
        folder = root / f"{kind}s"
        folder.mkdir(parents=True, exist_ok=True)
        for s in range(counts[kind]):
            samples = [
                record(kind, s * per_shard + i, rng, text=(i % text_every == 0), version=version)
                for i in range(per_shard)
            ]
            write_shard(folder / f"{shard_name(s)}.tar", samples)
    return root
