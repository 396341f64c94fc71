"""Export a training checkpoint for sampling.

    python -m training.export --ckpt DIR --out EXPORT_DIR --trust-checkpoint   # trained weights
    python -m training.export --ckpt DIR --out EXPORT_DIR --ema                # EMA weights

DIR is a checkpoint directory (`OUTPUT/checkpoints/step_XXXXXXX`) or a run directory (its newest
complete checkpoint is used). Writes `EXPORT_DIR/unet.safetensors` (consolidated fp32 weights
through DeepSpeed's `get_fp32_state_dict_from_zero_checkpoint`, any ZeRO stage) and
`EXPORT_DIR/model.yaml` (unet and diffusion configs, text encoder and VAE specs).

The trained weights live in DeepSpeed's files, which `torch.load` unpickles: that runs whatever
code the checkpoint's author put there, so it needs `--trust-checkpoint`, as sampling from a
DeepSpeed checkpoint does. `--ema` reads `ema.safetensors` (tensors only) and needs no trust.
The export itself is tensors only and loads anywhere.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml


class UntrustedExportError(ValueError):
    """Consolidating DeepSpeed's (pickled) files without `--trust-checkpoint`."""


def export(ckpt: str | Path, out: str | Path, ema: bool = False, trust_checkpoint: bool = False) -> Path:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file, save_file

    from training.checkpoint import resolve_resume

    path = resolve_resume(str(ckpt), Path(ckpt).parent)
    if not ema and not trust_checkpoint:
        raise UntrustedExportError(
            f"{path} is a DeepSpeed checkpoint: exporting its trained weights unpickles Python objects, "
            "which can run any code its author put there. If it is your run's (or you trust where it "
            "came from), pass --trust-checkpoint; --ema exports the EMA weights (safetensors) without it"
        )
    # The config saved with the checkpoint; older layouts only have the run's config.yaml.
    config_file = next(
        (p for p in (path / "config.yaml", path.parent.parent / "config.yaml") if p.is_file()), None
    )
    if config_file is None:
        raise FileNotFoundError(
            f"no config.yaml in {path} or its run directory: export needs the training config"
        )
    train_cfg = yaml.safe_load(config_file.read_text())
    if ema:
        if not (path / "ema.safetensors").is_file():
            raise FileNotFoundError(f"{path} has no ema.safetensors (train with optim.ema_decay set)")
        state = load_file(str(path / "ema.safetensors"))
    else:
        state = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.float().contiguous() for k, v in state.items()}, str(out / "unet.safetensors"))
    model = {
        "unet": train_cfg["unet"],
        "diffusion": train_cfg["diffusion"],
        "text": train_cfg["model"]["text"],
        "vae": train_cfg["model"]["vae"],
        "source": {"checkpoint": str(path), "ema": ema},
        # The data's statistics: sampling defaults and range warnings (model/calibration.py).
        "statistics": train_cfg.get("statistics"),
    }
    (out / "model.yaml").write_text(yaml.safe_dump(model, sort_keys=False))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint directory or run directory")
    p.add_argument("--out", required=True, help="export directory")
    p.add_argument("--ema", action="store_true", help="export the EMA weights instead of the trained ones")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow unpickling DeepSpeed's files (needed for the trained weights)")
    args = p.parse_args(argv)
    try:
        out = export(args.ckpt, args.out, args.ema, args.trust_checkpoint)
    except UntrustedExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out / 'unet.safetensors'} and {out / 'model.yaml'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
