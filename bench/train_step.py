"""Training step benchmark: data-wait fraction and samples/s per role (image rank, video rank).

    python bench/train_step.py [--steps 20] [--warmup 3] [--workers 2]          # tiny, CPU
    python bench/train_step.py --full [--video-batch 1 --image-batch 16]          # on a GPU

Each role runs alone in one process (world of one) through the real Trainer, on synthetic
shards written to a temporary folder: tiny = F=8, latents 8x16 (128x64); --full = the
default config, F=32, latents 32x56 (448x256), precomputed [77,1024] text tokens (no text
encoder weights needed). Reported over the steps after the warm-up: mean data-wait fraction
(time blocked on the loader / step time; target <= 2% with 2 workers), samples/s, step time,
on GPUs peak memory and MFU, and the sample-level shuffle: the fraction of sample pairs within
a micro-batch that come from the same shard (target <= 1/K with `--shuffle-shards K`; K=1
reads shards in order, as before the shuffle).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

REPO = Path(__file__).resolve().parents[1]


def write_shards(root: Path, frames: int, h: int, w: int, text_dim: int | None, shards: int, per_shard: int):
    from core.shards import FORMAT_VERSION, SampleRecord, sample_key, shard_name

    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    size = {"width": w * 8, "height": h * 8}
    models = {"vae": "tiny", "text": None}
    (root / "dataset.json").write_text(json.dumps({
        "format_version": FORMAT_VERSION,
        "output_config": {"video": {"frames": frames, **size}, "image": size, "models": models},
    }))
    for kind in ("video", "image"):
        folder = root / f"{kind}s"
        folder.mkdir(parents=True)
        for s in range(shards):
            with tarfile.open(folder / f"{shard_name(s)}.tar", "w") as tar:
                for i in range(per_shard):
                    key = sample_key(f"{kind}-{s}-{i}")
                    shape = (frames, 4, h, w) if kind == "video" else (4, h, w)
                    feats = rng.standard_normal((frames, 8))
                    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
                    video = kind == "video"
                    latents = rng.standard_normal(shape).astype(np.float16)
                    text = rng.standard_normal((77, text_dim)).astype(np.float16) if text_dim else None
                    rec = SampleRecord(
                        key, f"{kind} {s} {i}", latents, {"source": key}, text=text,
                        motion=rng.uniform(5, 60, frames - 1).astype(np.float32) if video else None,
                        appearance=(feats @ feats.T).astype(np.float32) if video else None,
                    )
                    for name, data in rec.members():
                        info = tarfile.TarInfo(name)
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
            (folder / f"{shard_name(s)}.json").write_text(json.dumps({"ok": per_shard}))


def run_role(config: Path, overrides: list[str], data: Path, out: Path, steps: int, warmup: int) -> dict:
    from core.config import load_config
    from training.config import TrainConfig
    from training.loop import Trainer

    cfg = load_config(TrainConfig, config, ["train.resume=none", "train.tensorboard=false", *overrides])
    tr = Trainer(cfg, str(data), str(out)).setup()
    tr.loader = Recording(tr.loader)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    records = [tr.train_step() for _ in range(steps)][warmup:]
    tr.loader.close()
    pairs = [(a, b) for shards in tr.loader.shards for i, a in enumerate(shards) for b in shards[i + 1 :]]
    res = {
        "role": tr.role.role,
        "batch": tr.role.micro_batch,
        "k": cfg.data.shuffle_shards,
        "same_shard": sum(a == b for a, b in pairs) / len(pairs) if pairs else float("nan"),
        "wait": statistics.mean(r["data_wait_fraction"] for r in records),
        "wait_max": max(r["data_wait_fraction"] for r in records),
        "samples_s": statistics.mean(r["samples_per_s"] for r in records),
        "step_s": statistics.mean(r["step_time"] for r in records),
        "mfu": statistics.mean(r["mfu"] for r in records) if "mfu" in records[0] else None,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
    }
    del tr
    return res


class Recording:
    """The trainer's loader, keeping each batch's source shards (the trainer ignores them)."""

    def __init__(self, loader):
        self.loader, self.shards = loader, []

    def __next__(self):
        batch = next(self.loader)
        self.shards.append(batch["shards"])
        return batch

    def __getattr__(self, name):
        return getattr(self.loader, name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--full", action="store_true", help="full-size default config (needs a GPU)")
    p.add_argument("--video-batch", type=int, default=None)
    p.add_argument("--image-batch", type=int, default=None)
    p.add_argument("--shuffle-shards", type=int, nargs="+", default=[8, 1],
                   help="data.shuffle_shards values to compare (K open shards per loader worker)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU intra-op threads (on a shared CPU, OpenMP spin-waits make 2+ erratic)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        if args.full:
            config = REPO / "configs" / "train" / "default.yaml"
            write_shards(data, 32, 32, 56, 1024, shards=16, per_shard=32)
            common = ["model.text=null", "diffusion.text_dropout=0"]
        else:
            config = REPO / "configs" / "train" / "tiny.yaml"
            write_shards(data, 8, 8, 16, None, shards=16, per_shard=16)
            common = []
        common += [f"data.num_workers={args.workers}"]
        if args.video_batch:
            common.append(f"roles.video_micro_batch={args.video_batch}")
        if args.image_batch:
            common.append(f"roles.image_micro_batch={args.image_batch}")
        rows = []
        for k in args.shuffle_shards:
            for role, count in (("video", 0), ("image", 1)):
                t0 = time.time()
                res = run_role(config, [*common, f"roles.image_ranks={count}", f"data.shuffle_shards={k}"],
                               data, Path(tmp) / f"{role}-{k}", args.steps, args.warmup)
                res["wall"] = time.time() - t0
                rows.append(res)

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {args.threads} thread(s)"
    size = "full" if args.full else "tiny"
    print(f"\ntrain step benchmark ({size}, {device}, {args.workers} loader workers, "
          f"{args.steps - args.warmup} measured steps, load average {os.getloadavg()[0]:.1f})")
    print("| role | micro-batch | K | same-shard pairs (1/K) | data wait (mean / max) | samples/s "
          "| step time | peak mem | MFU |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        mem = f"{r['peak_gib']:.1f} GiB" if r["peak_gib"] is not None else "-"
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        wait = f"{r['wait']:.2%} / {r['wait_max']:.2%}"
        speed = f"{r['samples_s']:.2f} | {r['step_s']:.3f} s"
        shuffle = f"{r['k']} | {r['same_shard']:.3f} ({1 / r['k']:.3f})"
        print(f"| {r['role']} | {r['batch']} | {shuffle} | {wait} | {speed} | {mem} | {mfu} |")


if __name__ == "__main__":
    main()
