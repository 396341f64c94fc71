"""Pretrained weights into HiGenUNet (docs/method.md#model).

Layouts (`fmt`):
- `ldm`: Stable Diffusion 2.1 original checkpoint (`model.diffusion_model.*`) -> spatial parameters;
- `diffusers2d`: diffusers `UNet2DConditionModel` (SD 2.1 `unet/`) -> spatial parameters;
- `modelscope`: ModelScope-T2V `UNetSD` (our own layout) -> the whole backbone;
- `diffusers3d`: diffusers `UNet3DConditionModel` (`text-to-video-ms-1.7b`) -> the whole backbone.
HiGen's new modules (spatial prior, guidance MLPs) are in none of them and keep their zero init.

The key maps are built from `HiGenUNet.slots` (each backbone module's name in every layout), so
they follow the config. `load_pretrained` returns a `LoadReport` (loaded / missing / unexpected /
kept at init) and raises `WeightLoadError` naming keys and shapes for a checkpoint of another
architecture.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from model.unet import HiGenUNet, Slot

FORMATS = ("ldm", "diffusers2d", "modelscope", "diffusers3d")
SPATIAL_FORMATS = ("ldm", "diffusers2d")
_RENAMES = {
    # LDM ResBlock -> diffusers ResnetBlock2D
    "res": {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
            "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"},
    "down": {"op": "conv"},
}
_LDM_PREFIX = "model.diffusion_model."
_SHOW = 12


class WeightLoadError(ValueError):
    """The checkpoint does not fit the model; the message names the keys and shapes."""


@dataclass
class LoadReport:
    format: str
    loaded: list[str] = field(default_factory=list)  # our parameter names filled from the checkpoint
    missing: list[str] = field(default_factory=list)  # checkpoint keys this format should have but lacks
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys with no place in the model
    kept_init: list[str] = field(default_factory=list)  # our parameters this format does not provide

    def summary(self) -> str:
        return (f"{self.format}: loaded {len(self.loaded)} tensors, missing {len(self.missing)}, "
                f"unexpected {len(self.unexpected)}, kept at init {len(self.kept_init)}"
                + (f"; missing e.g. {self.missing[:_SHOW]}" if self.missing else "")
                + (f"; unexpected e.g. {self.unexpected[:_SHOW]}" if self.unexpected else ""))


def _rename(rest: str, kind: str) -> str:
    for old, new in _RENAMES.get(kind, {}).items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def key_map(unet: HiGenUNet, fmt: str) -> dict[str, str]:
    """{our state-dict key: checkpoint key in layout `fmt`} for every key that layout provides."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight layout {fmt!r}; choose one of {FORMATS}")
    slots = sorted(unet.slots, key=lambda s: len(s.ours), reverse=True)
    out: dict[str, str] = {}
    for name in unet.state_dict():
        slot: Slot | None = next((s for s in slots if name.startswith(s.ours + ".")), None)
        if slot is None or (slot.temporal and fmt in SPATIAL_FORMATS):
            continue
        rest = name[len(slot.ours) + 1:]
        if fmt == "modelscope":
            out[name] = name
        elif fmt == "ldm":
            out[name] = f"{slot.ldm}.{rest}"
        else:
            out[name] = f"{slot.diffusers}.{_rename(rest, slot.kind)}"
    return out


def detect_format(keys) -> str:
    keys = list(keys)
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if has("transformer_in.") or any(".temp_convs." in k for k in keys):
        return "diffusers3d"
    if has("down_blocks.") and has("conv_in."):
        return "diffusers2d"
    if has("input_blocks.0.1.") or any(".temopral_conv." in k for k in keys):
        return "modelscope"
    if "input_blocks.0.0.weight" in keys:
        return "ldm"
    raise WeightLoadError(f"not a UNet checkpoint of a known layout ({', '.join(FORMATS)}); "
                          f"{len(keys)} keys, e.g. {sorted(keys)[:_SHOW]}")


def read_state_dict(source: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors / .ckpt / .pt / .pth / .bin file, a diffusers folder (or its
    parent pipeline folder with `unet/`), or a hub id of such a repo. Never unpickles objects."""
    path = Path(source)
    if path.is_dir():
        for cand in (path / "unet", path):
            for fname in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
                if (cand / fname).is_file():
                    return read_state_dict(cand / fname)
        raise WeightLoadError(f"{path}: no diffusion_pytorch_model.safetensors/.bin in it "
                              f"or in {path / 'unet'}")
    if not path.is_file():
        if "/" in str(source) and not str(source).startswith((".", "/")):
            from huggingface_hub import hf_hub_download

            return read_state_dict(hf_hub_download(str(source), "unet/diffusion_pytorch_model.safetensors"))
        raise WeightLoadError(f"weights {source} not found (a file, a diffusers folder or a hub id)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        data = load_file(str(path))
    else:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "module", "model"):
        if isinstance(data, dict) and isinstance(data.get(wrapper), dict):
            data = data[wrapper]
    if not isinstance(data, dict):
        raise WeightLoadError(f"{path}: expected a state dict, got {type(data).__name__}")
    return data


def load_pretrained(unet: HiGenUNet, source, fmt: str = "auto", strict: bool = True) -> LoadReport:
    """Copy a checkpoint (a state dict, or anything `read_state_dict` accepts) into `unet`.

    strict: raise `WeightLoadError` if the checkpoint lacks keys its layout should have, or has
    keys without a place in the model. Shape mismatches and an empty match always raise."""
    state = dict(source) if isinstance(source, dict) else read_state_dict(source)
    if any(k.startswith(_LDM_PREFIX) for k in state):  # full SD checkpoint: keep the UNet part
        state = {k[len(_LDM_PREFIX):]: v for k, v in state.items() if k.startswith(_LDM_PREFIX)}
    fmt = detect_format(state) if fmt == "auto" else fmt
    mapping = key_map(unet, fmt)
    report = LoadReport(format=fmt)
    ours = unet.state_dict()
    report.kept_init = [k for k in ours if k not in mapping]
    mismatched: list[str] = []
    with torch.no_grad():
        for name, src in mapping.items():
            if src not in state:
                report.missing.append(src)
                continue
            value, target = state[src], ours[name]
            if value.shape != target.shape:
                # ModelScope's temporal proj_in/out are 1x1 Conv1d ([o,i,1]); ours are Linear ([o,i]).
                if value.numel() == target.numel() and value.squeeze().shape == target.squeeze().shape:
                    value = value.reshape(target.shape)
                else:
                    mismatched.append(f"{src} {tuple(value.shape)} -> {name} {tuple(target.shape)}")
                    continue
            target.copy_(value.to(target.dtype))
            report.loaded.append(name)
    wanted = set(mapping.values())
    report.unexpected = sorted(k for k in state if k not in wanted)
    if mismatched:
        raise WeightLoadError(f"{fmt} checkpoint has {len(mismatched)} tensors whose shapes do not fit this "
                              f"UNetConfig (another architecture or config?): {mismatched[:_SHOW]}")
    if not report.loaded:
        raise WeightLoadError(f"no tensor of the {fmt} checkpoint matched the model; "
                              f"checkpoint keys e.g. {sorted(state)[:_SHOW]}")
    if strict and (report.missing or report.unexpected):
        raise WeightLoadError("checkpoint does not match the model (pass strict=False to load anyway): "
                              + report.summary())
    return report
