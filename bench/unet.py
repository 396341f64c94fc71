"""Benchmark of the full-size HiGen UNet (issue 4).

1. Parameter count of `UNetConfig()` next to diffusers' `UNet3DConditionModel` at the
   `text-to-video-ms-1.7b` configuration (random weights, built on the meta device: no memory),
   with the difference itemised by module.
2. Forward + backward time and peak memory, batch 1, gradient checkpointing off and on. Each
   setting runs in its own process so peaks do not mix: CPU peak = the process's maximum RSS
   (getrusage), GPU peak = torch.cuda.max_memory_allocated.

    python bench/unet.py                                  # CPU, F=32 at 448x256 (latent 32x56)
    python bench/unet.py --frames 2 --iters 2             # what fits a 2-core CPU box
    python bench/unet.py --device cuda --dtype bf16       # GPU, bf16
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.config import UNetConfig  # noqa: E402
from model.unet import HiGenUNet  # noqa: E402
from model.weights import key_map  # noqa: E402

# diffusers' text-to-video-ms-1.7b unet/config.json (equal to UNet3DConditionModel's defaults).
MS_1_7B = dict(in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
               down_block_types=("CrossAttnDownBlock3D",) * 3 + ("DownBlock3D",),
               up_block_types=("UpBlock3D",) + ("CrossAttnUpBlock3D",) * 3, cross_attention_dim=1024,
               attention_head_dim=64, norm_num_groups=32, norm_eps=1e-5, downsample_padding=1)


def param_table() -> None:
    from diffusers import UNet3DConditionModel

    with torch.device("meta"):
        ours = HiGenUNet(UNetConfig())
        ref = UNet3DConditionModel(**MS_1_7B)
    n_ours = sum(p.numel() for p in ours.parameters())
    n_ref = sum(p.numel() for p in ref.parameters())
    mapped = key_map(ours, "diffusers3d")
    extra: Counter[str] = Counter()
    for name, p in ours.named_parameters():
        if name not in mapped:
            extra[name.split(".")[0]] += p.numel()
    missing = sorted(set(ref.state_dict()) - set(mapped.values()))
    print("\n## Parameters (full-size config vs diffusers UNet3DConditionModel, text-to-video-ms-1.7b)\n")
    print("| model / module | parameters |\n| --- | ---: |")
    print(f"| diffusers UNet3DConditionModel (ms-1.7b) | {n_ref:,} |")
    print(f"| HiGenUNet(UNetConfig()) | {n_ours:,} |")
    labels = {"spatial_prior": "spatial prior conv 4->320 3x3",
              "motion_embedding": "motion MLP 320->1280->1280",
              "appearance_embedding": "appearance MLP 32->1280->1280",
              "text_projection": "text token projection"}
    for mod, count in extra.items():
        print(f"| + {labels.get(mod, mod)} | {count:,} |")
    print(f"| backbone keys of diffusers without a place in HiGenUNet | {len(missing)} |")
    diff = n_ours - n_ref
    print(f"| difference | {diff:+,} ({100 * diff / n_ref:+.3f} %, target within 2 %) |")


class _FlashLikeAttention(torch.autograd.Function):
    """Stands in for SDPA on the meta device, saving what GPU flash attention saves (q, k, v, output,
    float32 log-sum-exp) instead of the math path's full attention matrix."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out


def saved_activations(args: argparse.Namespace, checkpointing: bool) -> Counter:
    """Bytes saved for backward per UNet block ("outer": outside the blocks), from a forward on the
    meta device (no memory, no compute) with saved-tensor hooks. With checkpointing, a block's
    entry is only the input the checkpoint keeps."""
    from torch import nn

    f, h, w = args.frames, args.height // 8, args.width // 8
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    per_block: Counter = Counter()
    current, seen = ["outer"], set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata  # one count per storage (views share it)
        if key not in seen:
            seen.add(key)
            per_block[current[0]] += t.untyped_storage().nbytes()
        return t

    sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = lambda q, k, v: _FlashLikeAttention.apply(q, k, v)
    try:
        with torch.device("meta"):
            unet = HiGenUNet(UNetConfig(gradient_checkpointing=checkpointing)).to(dtype).train()
            blocks = [unet.input_blocks[0], *unet.input_blocks[1:], unet.middle_block, *unet.output_blocks]
            for i, block in enumerate(blocks):
                first = block[0] if isinstance(block, nn.ModuleList) else block
                first.register_forward_pre_hook(lambda *_, i=i: current.__setitem__(0, i))
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                unet(torch.randn(1, 4, f, h, w, dtype=dtype), torch.tensor([500]), torch.randn(1, 77, 1024),
                     torch.randn(1, 4, h, w), torch.rand(1, f - 1), torch.rand(1, f, f))
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
    return per_block


def estimate_table(args: argparse.Namespace) -> None:
    gib = 1024**3
    with torch.device("meta"):
        n = sum(p.numel() for p in HiGenUNet(UNetConfig()).parameters())
    size = {"fp32": 4, "bf16": 2}[args.dtype]
    print(f"\n## Estimate: activations saved for backward, F={args.frames} at {args.width}x{args.height}, "
          f"{args.dtype}, flash-style attention (meta device, no compute)\n")
    # Upper bound: without checkpointing, grads are allocated while activations are being freed.
    print("| gradient checkpointing | kept for backward (GiB) | + largest block recomputed (GiB) "
          "| + weights + grads, upper bound (GiB) |")
    print("| --- | ---: | ---: | ---: |")
    full = saved_activations(args, False)
    largest = max(v for k, v in full.items() if k != "outer")  # one block's activations, recomputed
    for ckpt in (False, True):
        kept = sum((saved_activations(args, True) if ckpt else full).values())
        peak = kept + (largest if ckpt else 0)
        print(f"| {'on' if ckpt else 'off'} | {kept / gib:.1f} | {peak / gib:.1f} | "
              f"{(peak + 2 * n * size) / gib:.1f} |")


def run_once(args: argparse.Namespace, checkpointing: bool) -> dict:
    """Child process: build the model, time `iters` forward+backward passes after one warm-up."""
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    build_start = time.perf_counter()
    unet = HiGenUNet(UNetConfig(gradient_checkpointing=checkpointing)).to(device, dtype).train()
    f, h, w = args.frames, args.height // 8, args.width // 8
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, f, h, w, generator=gen).to(device, dtype)
    kw = dict(spatial_prior=torch.randn(1, 4, h, w, generator=gen).to(device, dtype),
              motion=(torch.rand(1, f - 1, generator=gen) * 50).to(device),
              appearance_matrix=torch.rand(1, f, f, generator=gen).to(device))
    ctx = torch.randn(1, 77, 1024, generator=gen).to(device, dtype)
    t = torch.tensor([500], device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times, build_s = [], time.perf_counter() - build_start
    for i in range(args.iters + 1):
        start = time.perf_counter()
        unet(x, t, ctx, **kw).float().square().mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        unet.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        print(f"  checkpointing={checkpointing} pass {i}: {time.perf_counter() - start:.1f} s",
              file=sys.stderr, flush=True)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    timed = times[1:] or times  # the first pass is a warm-up
    return dict(checkpointing=checkpointing, build_s=build_s, warmup_s=times[0],
                seconds=sum(timed) / len(timed), model_bytes=base, peak_bytes=peak)


def timing_table(args: argparse.Namespace) -> None:
    rows = []
    for ckpt in (False, True):
        cmd = [sys.executable, __file__, "--child", str(int(ckpt)), "--device", args.device,
               "--dtype", args.dtype, "--frames", str(args.frames), "--height", str(args.height),
               "--width", str(args.width), "--iters", str(args.iters)]
        done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        if done.returncode != 0:
            rows.append(dict(checkpointing=ckpt, error=f"exit {done.returncode} (out of memory?)"))
        else:
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    gib = 1024**3
    where = "GPU max_memory_allocated" if args.device.startswith("cuda") else "process max RSS"
    print(f"\n## Forward+backward, batch 1, F={args.frames} at {args.width}x{args.height} "
          f"(latent {args.height // 8}x{args.width // 8}), {args.device} {args.dtype}, "
          f"{torch.get_num_threads()} threads, mean of {args.iters} passes after 1 warm-up\n")
    print("| gradient checkpointing | s / iteration | warm-up pass (s) | memory after model build (GiB) "
          f"| peak, {where} (GiB) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        if "error" in r:
            print(f"| {'on' if r['checkpointing'] else 'off'} | {r['error']} | | | |")
        else:
            print(f"| {'on' if r['checkpointing'] else 'off'} | {r['seconds']:.1f} | {r['warmup_s']:.1f} | "
                  f"{r['model_bytes'] / gib:.2f} | {r['peak_bytes'] / gib:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=448)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--params-only", action="store_true")
    parser.add_argument("--estimate-only", action="store_true",
                        help="only the parameter and meta-device memory tables")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(run_once(args, bool(args.child))))
        return
    param_table()
    if args.params_only:
        return
    estimate_table(args)
    if not args.estimate_only:
        timing_table(args)


if __name__ == "__main__":
    main()
