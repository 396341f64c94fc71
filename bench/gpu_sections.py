"""The five measurements of `bench/gpu_check.sh` (issue 17). Each function takes a `Sizes`
(full on a GPU, tiny for `--cpu-rehearsal`) and returns a JSON-able dict of rows.

1. `encoders`: VAE encode (SD 2.1 VAE dimensions) and DINOv2 ViT-S/14, random-initialised,
   over a batch sweep: frames/s, clips/s, and the fraction of the FLOP limit (FLOPs counted
   by `torch.utils.flop_counter` on one batch).
2. `prep`: end-to-end `PrepJob` on synthetic 640x360 clips with encoder actors, per decoder
   backend; models saved to local folders first (the real local-path loading).
3. `unet`: the HiGen UNet fwd+bwd with gradient checkpointing at micro-batch 1 and 2.
4. `image`: a spatial-only (F=1) image fwd+bwd at micro-batch 32.
5. `zero2`: five ZeRO-2 steps through the `deepspeed` launcher on one rank.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

# SD 2.1 VAE (stabilityai/stable-diffusion-2-1 vae/config.json): the encoder is what prep runs.
SD21_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=768,
                scaling_factor=0.18215)


@dataclass
class Sizes:
    rehearsal: bool
    device: str
    dtype: torch.dtype
    frames: int = 32
    width: int = 448
    height: int = 256
    sweep: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    clips: int = 64
    image_batch: int = 32
    zero_steps: int = 5

    @classmethod
    def pick(cls, rehearsal: bool) -> Sizes:
        if rehearsal:  # one thread: OpenMP spin-waits make several erratic on a shared CPU
            torch.set_num_threads(1)
            return cls(True, "cpu", torch.float32, frames=8, width=128, height=64, sweep=[2, 4], clips=4,
                       image_batch=4, zero_steps=2)
        return cls(False, "cuda", torch.bfloat16)


def peak_flops(sizes: Sizes) -> float | None:
    from training.metrics import peak_flops as table

    return table() if sizes.device == "cuda" else None


def _sync(sizes: Sizes) -> None:
    if sizes.device == "cuda":
        torch.cuda.synchronize()


def _timed(fn, sizes: Sizes, iters: int) -> float:
    fn()  # warm-up (cuDNN autotune, allocator)
    _sync(sizes)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(sizes)
    return (time.perf_counter() - start) / iters


def _flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


def build_vae(sizes: Sizes):
    from diffusers import AutoencoderKL

    from core.encoders import TINY_VAE_CONFIG

    torch.manual_seed(0)
    vae = AutoencoderKL(**(TINY_VAE_CONFIG if sizes.rehearsal else SD21_VAE))
    return vae.to(sizes.device, sizes.dtype).eval().requires_grad_(False)


def build_dino(sizes: Sizes):
    import timm

    from core.semantic import TINY_TIMM

    torch.manual_seed(0)
    kwargs = TINY_TIMM if sizes.rehearsal else dict(img_size=224)
    net = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, **kwargs)
    return net.to(sizes.device, sizes.dtype).eval().requires_grad_(False)


@torch.inference_mode()
def encoders(sizes: Sizes) -> dict:
    vae, dino = build_vae(sizes), build_dino(sizes)
    side = dino.patch_embed.img_size[0]
    peak, rows = peak_flops(sizes), []
    for batch in sizes.sweep:
        x = torch.randn(batch, 3, sizes.height, sizes.width, device=sizes.device, dtype=sizes.dtype)
        y = torch.randn(batch, 3, side, side, device=sizes.device, dtype=sizes.dtype)
        for name, fn in (("vae_encode", lambda x=x: vae.encode(x).latent_dist.mean),
                         ("dinov2_vits14", lambda y=y: dino(y))):
            try:
                flops = _flops(fn)
                seconds = _timed(fn, sizes, 3 if sizes.rehearsal else 10)
            except torch.OutOfMemoryError:
                rows.append(dict(model=name, batch=batch, error="out of memory"))
                torch.cuda.empty_cache()
                continue
            fps = batch / seconds
            rows.append(dict(model=name, batch=batch, frames_s=fps, clips_s=fps / sizes.frames,
                             tflop_per_frame=flops / batch / 1e12,
                             flop_fraction=(flops / seconds / peak) if peak else None))
    return dict(rows=rows, peak_flops=peak, input=f"{sizes.width}x{sizes.height}", dino_side=side)


def _save_models(sizes: Sizes, root: Path) -> tuple[str, str]:
    """Random-initialised models at real sizes in local folders: the actors load them from a path."""
    from safetensors.torch import save_file

    vae_dir = root / "vae"
    build_vae(sizes).float().save_pretrained(vae_dir)
    weights = root / "dinov2_vits14.safetensors"
    save_file({k: v.float().contiguous() for k, v in build_dino(sizes).state_dict().items()}, weights)
    return str(vae_dir), str(weights)


def _clips(sizes: Sizes, root: Path) -> Path:
    """`sizes.clips` synthetic 640x360 h264 clips, 3 s at 24 fps, as a parquet manifest."""
    from fractions import Fraction

    import numpy as np
    import pandas as pd

    from preprocessing.synthetic import render_clip, write_video

    rows = []
    root.mkdir(parents=True, exist_ok=True)
    for i in range(sizes.clips):
        frames, _ = render_clip(np.random.default_rng(i), 640, 360, 72, 24.0, 40.0 + i, (1, 0), 0.5)
        path = root / f"clip{i:03d}.mp4"
        write_video(path, frames, "libx264", Fraction(24))
        rows.append({"video": str(path), "caption": f"synthetic clip {i}"})
    pd.DataFrame(rows).to_parquet(root / "clips.parquet", index=False)
    return root / "clips.parquet"


def prep(sizes: Sizes, workdir: Path, decoders: list[str]) -> dict:
    """Each backend through the real job (Ray local cluster; GPU actors, or CPU actors when
    rehearsing). nvdec needs CUDA: when rehearsing, its in-actor path runs on the CPU device
    by `nvdec_path` instead."""
    from core.config import load_config
    from pipeline.config import PrepConfig

    workdir.mkdir(parents=True, exist_ok=True)
    vae, dino = _save_models(sizes, workdir / "models")
    manifest = _clips(sizes, workdir)
    common = [f"video.frames={sizes.frames}", f"video.width={sizes.width}", f"video.height={sizes.height}",
              f"models.vae={vae}", "models.semantic=timm:vit_small_patch14_dinov2",
              f"models.semantic_checkpoint={dino}", "models.batch_frames=256", "execution.progress=false",
              "samples_per_shard=16"]
    if sizes.rehearsal:
        common += ["models.semantic=tiny", "models.semantic_checkpoint=null", "models.device=cpu",
                   "execution.encoders=1", "execution.gpus_per_encoder=0", "execution.local_cpus=2",
                   "models.batch_frames=16"]
    else:
        common += ["execution.encoders=2", "execution.gpus_per_encoder=0.5", "execution.cpus_per_encoder=2"]
    rows = []
    for decoder in decoders:
        overrides = [*common, f"video.decoder={decoder}"]
        cfg = load_config(PrepConfig, REPO / "configs/prep/default.yaml", overrides)
        try:
            timed = _timed_job(cfg, workdir / f"out-{decoder}", manifest)
            rows.append(dict(decoder=decoder, clips=sizes.clips, **timed))
        except Exception as exc:
            rows.append(dict(decoder=decoder, error=f"{type(exc).__name__}: {str(exc)[:300]}"))
    return dict(rows=rows, note="clips_s: shard dispatch with the encoder actors up (models loaded); "
                                "job_s: the whole job, cluster and actor start included")


def _timed_job(cfg, out: Path, manifest: Path) -> dict:
    """The job's steps (`pipeline.runner`), timing the dispatch once the actors are up."""
    import ray

    from pipeline.runner import Cluster, Dispatch, Finalize, JobArgs, Preflight
    from pipeline.shard import ShardTask
    from pipeline.summary import Summary

    start = time.perf_counter()
    args = JobArgs(out=str(out), videos=str(manifest), overwrite=True)
    ready = Preflight(cfg, args).run()
    cluster = Cluster(cfg)
    actors: list = []
    try:
        workers, actors = cluster.run()
        task = ShardTask(cfg, args.out, ready.fingerprint, actors, cluster.model_ids, cluster.actor_nodes,
                         cluster.local_paths, run_id=ready.lease.run_id)
        summary = Summary(out=args.out, workers=workers, encoders=len(actors))
        dispatch = Dispatch(cfg, ready.store, ray.put(task), workers, False, ready.lease)
        t = time.perf_counter()
        dispatch.run(ready.manifests["videos"], summary.kind("videos"))
        seconds = time.perf_counter() - t
        Finalize(cfg, ready, args).run(summary)
    finally:
        cluster.shutdown(actors)
        ready.lease.release()
    totals = summary.totals.get("videos") or {}
    clips = totals.get("ok", 0) + totals.get("failed", 0)
    return dict(ok=totals.get("ok"), failed=totals.get("failed"), reasons=totals.get("reasons"),
                workers=workers, actors=len(actors), dispatch_s=seconds, clips_s=clips / seconds,
                job_s=time.perf_counter() - start, **_decoders_used(out))


def _decoders_used(out: Path) -> dict:
    """Which decoder each written clip names in its KEY.json, and the first fallback reason."""
    import tarfile
    from collections import Counter

    used, fallback = Counter(), None
    for path in sorted((out / "videos").glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    used[meta.get("decoder")] += 1
                    fallback = fallback or meta.get("decoder_fallback")
    return dict(decoders=dict(used), fallback=fallback)


def nvdec_path(sizes: Sizes, workdir: Path) -> dict:
    """The nvdec path of the encoder actor on `sizes.device` (the CPU when rehearsing): probe in
    the isolated child, decode in the actor, one clip forced onto the CPU fallback."""
    from dataclasses import replace

    from core.config import load_config
    from pipeline.config import PrepConfig
    from pipeline.encoder_actor import EncoderActor
    from preprocessing.process import Decoder

    manifest = workdir / "clips.parquet"
    if not manifest.exists():
        _clips(sizes, workdir)
    import pandas as pd

    paths = pd.read_parquet(manifest).video.tolist()[:2]
    cfg = load_config(PrepConfig, REPO / "configs/prep/tiny.yaml",
                      [f"video.frames={sizes.frames}", "video.decoder=nvdec",
                       f"models.device={sizes.device}"])
    actor = EncoderActor(cfg)
    with Decoder(cfg.video, cfg.image) as dec:
        probed = [dec.decode("video", p, "a clip") for p in paths]
    broken = replace(probed[1], meta={**probed[1].meta, "original_size": [16, 16]})  # GPU decode refuses
    results = actor.encode_sync([probed[0], broken], 2)
    rows = []
    for res in results:
        meta = json.loads(dict(res[2])[f"{res[1]}.json"]) if res[0] == "ok" else {}
        rows.append(dict(status=res[0], decoder=meta.get("decoder"), fallback=meta.get("decoder_fallback")))
    return dict(rows=rows)


def _unet_inputs(cfg, batch: int, frames: int, h: int, w: int, sizes: Sizes):
    g = torch.Generator().manual_seed(0)
    dev, dt = sizes.device, sizes.dtype
    x = torch.randn(batch, 4, frames, h, w, generator=g).to(dev, dt)
    ctx = torch.randn(batch, 77, cfg.context_dim, generator=g).to(dev, dt)
    t = torch.full((batch,), 500, device=dev)
    if frames == 1:
        return (x, t, ctx), dict(spatial_only=True)
    kw = dict(spatial_prior=torch.randn(batch, 4, h, w, generator=g).to(dev, dt),
              motion=(torch.rand(batch, frames - 1, generator=g) * 50).to(dev),
              appearance_matrix=torch.rand(batch, frames, frames, generator=g).to(dev))
    return (x, t, ctx), kw


def _unet_rows(sizes: Sizes, batches: list[int], frames: int) -> list[dict]:
    from model.config import UNetConfig
    from model.unet import HiGenUNet

    cfg = (UNetConfig.tiny(frames=max(frames, 2), gradient_checkpointing=True) if sizes.rehearsal
           else UNetConfig(frames=max(frames, 2), gradient_checkpointing=True))
    torch.manual_seed(0)
    unet = HiGenUNet(cfg).to(sizes.device, sizes.dtype).train()
    h, w = sizes.height // 8, sizes.width // 8
    peak, rows = peak_flops(sizes), []
    for batch in batches:
        args, kw = _unet_inputs(cfg, batch, frames, h, w, sizes)

        def step(args=args, kw=kw):
            unet(*args, **kw).float().square().mean().backward()
            unet.zero_grad(set_to_none=True)

        try:
            flops = _flops(step)
            if sizes.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            seconds = _timed(step, sizes, 2 if sizes.rehearsal else 5)
        except torch.OutOfMemoryError:
            rows.append(dict(micro_batch=batch, frames=frames, error="out of memory"))
            torch.cuda.empty_cache()
            continue
        mem = torch.cuda.max_memory_allocated() / 2**30 if sizes.device == "cuda" else None
        rows.append(dict(micro_batch=batch, frames=frames, step_s=seconds, peak_gib=mem,
                         tflop_per_step=flops / 1e12, mfu=(flops / seconds / peak) if peak else None))
    return rows


def unet(sizes: Sizes) -> dict:
    latent = f"{sizes.height // 8}x{sizes.width // 8}"
    return dict(rows=_unet_rows(sizes, [1, 2], sizes.frames), latent=latent)


def image(sizes: Sizes) -> dict:
    return dict(rows=_unet_rows(sizes, [sizes.image_batch], 1))


def zero2(sizes: Sizes, workdir: Path) -> dict:
    """`deepspeed --num_gpus 1 training/train.py` for `zero_steps` steps (NCCL on a GPU, gloo on CPU)."""
    sys.path.insert(0, str(REPO / "bench"))
    from train_step import write_shards

    from testing.net import free_port

    data, out = workdir / "data", workdir / "run"
    if sizes.rehearsal:
        write_shards(data, 8, 8, 16, None, shards=2, per_shard=8)
        config, extra = REPO / "configs/train/tiny.yaml", []
    else:
        write_shards(data, 32, 32, 56, 1024, shards=2, per_shard=16)
        config, extra = REPO / "configs/train/default.yaml", ["model.text=null", "diffusion.text_dropout=0",
                                                              "roles.video_micro_batch=1"]
    launcher = Path(sys.executable).parent / "deepspeed"
    cmd = [str(launcher) if launcher.exists() else "deepspeed", "--num_gpus", "1", "--master_port",
           str(free_port()), "training/train.py", "--config", str(config), "--data", str(data),
           "--output", str(out), "--max-steps", str(sizes.zero_steps), "--save-every", "1000000",
           "--resume", "none", "deepspeed.zero_stage=2", "train.tensorboard=false", "train.log_every=1",
           "roles.image_ratio=0", *extra]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if sizes.rehearsal:
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    wall = time.perf_counter() - start
    steps = []
    metrics = out / "metrics.jsonl"
    if metrics.exists():
        steps = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    backend = "gloo" if sizes.rehearsal else "nccl"
    row = dict(rc=done.returncode, backend=backend, wall_s=wall, steps=len(steps),
               step_s=[round(s.get("step_time", 0.0), 4) for s in steps], mfu=[s.get("mfu") for s in steps])
    if done.returncode != 0:
        row["tail"] = (done.stdout + done.stderr)[-1500:]
    return dict(rows=[row])
