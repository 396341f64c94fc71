"""Find and load the UNet (with the configs that travel with it) for sampling and evaluation.

`--ckpt` may name:
- an export directory (`unet.safetensors` + `model.yaml`, as `python -m training.export` writes);
- an exported state dict file (`.safetensors`, or `.pt`/`.bin` read with `weights_only=True`)
  with `model.yaml` beside it;
- a training output directory: its `export/` when that export is of the newest complete
  checkpoint, else the newest complete checkpoint under `checkpoints/`, consolidated in memory
  with DeepSpeed's `get_fp32_state_dict_from_zero_checkpoint` and configured by `config.yaml`;
- one checkpoint directory (`checkpoints/step_XXXXXXX`), consolidated the same way.

Safetensors exports load from anywhere. A DeepSpeed checkpoint is a set of pickles: reading it
can run code from whoever wrote it, so it loads only with `trust_checkpoint=True`
(`--trust-checkpoint`); `python -m training.export --trust-checkpoint` turns it into a
safetensors export once.

`model.yaml` / `config.yaml` carry the training data's `statistics` (core/statistics.py) when the
run had them; `ModelBundle.statistics` is None for older runs (calibration unavailable).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from core.config import from_dict
from core.statistics import DataStatistics, StatisticsError
from model.config import DiffusionConfig, UNetConfig

EXPORT_WEIGHTS = "unet.safetensors"
EXPORT_CONFIG = "model.yaml"


class CheckpointError(ValueError):
    """`--ckpt` names nothing that can be sampled from; the message says what was found."""


@dataclass
class ModelBundle:
    """Everything sampling needs: the UNet, its configs and the frozen encoders' specs."""

    unet: torch.nn.Module
    unet_cfg: UNetConfig
    diffusion_cfg: DiffusionConfig
    text: str
    vae: str
    source: str  # what was loaded, for logs and output metadata
    step: int | None = None  # training step of the weights, when known
    statistics: DataStatistics | None = None  # the training data's, None for older runs


def _read_model_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict) or "unet" not in data:
        raise CheckpointError(f"{path} has no 'unet' section; is it a model.yaml from training.export?")
    return data


def _specs(data: dict[str, Any], where: Path) -> tuple[str, str]:
    """(text spec, vae spec) from a model.yaml / train config.yaml (top level or `model:`)."""
    section = data.get("model") if isinstance(data.get("model"), dict) else {}
    text = data.get("text") or section.get("text")
    vae = data.get("vae") or section.get("vae")
    if not text or not vae:
        raise CheckpointError(f"{where} names no text encoder / VAE ('text' and 'vae' keys); "
                              "re-export the checkpoint with python -m training.export")
    return str(text), str(vae)


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    from model.weights import WeightLoadError, read_state_dict

    try:
        return read_state_dict(path)
    except (WeightLoadError, OSError, RuntimeError) as exc:
        raise CheckpointError(f"cannot read weights {path}: {exc}") from exc


def _strip_prefix(sd: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Accept state dicts saved from a wrapper (`module.`, `unet.`): keep the UNet's keys."""
    if set(sd) & expected:
        return sd
    for prefix in ("module.", "unet.", "module.unet.", "model."):
        stripped = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if set(stripped) & expected:
            return stripped
    return sd


def build_unet(unet_cfg: UNetConfig, state_dict: dict[str, torch.Tensor], source: str) -> torch.nn.Module:
    from model.unet import HiGenUNet

    unet = HiGenUNet(unet_cfg)
    expected = set(unet.state_dict())
    state_dict = _strip_prefix(state_dict, expected)
    missing, unexpected = expected - set(state_dict), set(state_dict) - expected
    if missing or unexpected:
        raise CheckpointError(f"{source}: weights do not match the UNet config ({len(missing)} missing, "
                              f"e.g. {sorted(missing)[:3]}; {len(unexpected)} unexpected, "
                              f"e.g. {sorted(unexpected)[:3]})")
    unet.load_state_dict(state_dict)
    return unet.eval().requires_grad_(False)


def _bundle(data: dict[str, Any], state_dict: dict[str, torch.Tensor], where: Path, source: str,
            step: int | None) -> ModelBundle:
    unet_cfg = from_dict(UNetConfig, data["unet"])
    diffusion_cfg = from_dict(DiffusionConfig, data.get("diffusion") or {})
    text, vae = _specs(data, where)
    statistics = None
    if data.get("statistics") is not None:
        try:
            statistics = DataStatistics.from_dict(data["statistics"], f"{where}: statistics")
        except StatisticsError as exc:
            raise CheckpointError(str(exc)) from exc
    unet = build_unet(unet_cfg, state_dict, source)
    return ModelBundle(unet, unet_cfg, diffusion_cfg, text, vae, source, step, statistics)


def _step_of(ckpt: str | Path | None) -> int | None:
    suffix = Path(ckpt).name.rsplit("_", 1)[-1] if ckpt else ""
    return int(suffix) if suffix.isdigit() else None


def load_export(path: Path) -> ModelBundle:
    """An export directory or a state dict file with model.yaml beside it."""
    weights = path / EXPORT_WEIGHTS if path.is_dir() else path
    config = weights.parent / EXPORT_CONFIG
    if not weights.is_file():
        raise CheckpointError(f"--ckpt {path}: no {EXPORT_WEIGHTS} in it")
    if not config.is_file():
        raise CheckpointError(f"--ckpt {path}: no {EXPORT_CONFIG} beside {weights.name}; the model config "
                              "must travel with the weights (python -m training.export writes both)")
    data = _read_model_yaml(config)
    source = data.get("source") if isinstance(data.get("source"), dict) else {}
    return _bundle(data, _load_state_dict(weights), config, str(weights), _step_of(source.get("checkpoint")))


def consolidate(ckpt: Path, train_config: Path, trust_checkpoint: bool = False) -> ModelBundle:
    """A DeepSpeed checkpoint directory -> fp32 UNet, as `training.export` consolidates it (trained
    weights, not EMA), kept in memory. Unpickles: only with `trust_checkpoint`."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if not trust_checkpoint:
        raise CheckpointError(
            f"{ckpt} is a DeepSpeed checkpoint: loading it unpickles Python objects, which can run any "
            "code its author put there. If you trust where it came from, pass --trust-checkpoint, or "
            f"export it once (python -m training.export --ckpt {ckpt} --out EXPORT_DIR "
            "--trust-checkpoint) and pass --ckpt EXPORT_DIR: a safetensors export loads from anywhere")
    if not train_config.is_file():
        raise CheckpointError(f"{ckpt}: no {train_config} holding the model config; pass an export instead")
    data = _read_model_yaml(train_config)
    state_dict = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    return _bundle(data, state_dict, train_config, str(ckpt), _step_of(ckpt))


def save_export(unet: torch.nn.Module, unet_cfg: UNetConfig, diffusion_cfg: DiffusionConfig, text: str,
                vae: str, out: str | Path, source: dict[str, Any] | None = None,
                statistics: DataStatistics | None = None) -> Path:
    """Write an export in `training.export`'s format (`unet.safetensors` + `model.yaml`), e.g. for
    a model built from pretrained weights without training, or a tiny one in tests."""
    from safetensors.torch import save_file

    from core.config import to_dict

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.float().contiguous() for k, v in unet.state_dict().items()}, str(out / EXPORT_WEIGHTS))
    model = {"unet": to_dict(unet_cfg), "diffusion": to_dict(diffusion_cfg), "text": text, "vae": vae,
             "source": source or {}, "statistics": statistics.to_dict() if statistics else None}
    (out / EXPORT_CONFIG).write_text(yaml.safe_dump(model, sort_keys=False))
    return out


def load_for_sampling(ckpt: str | Path, trust_checkpoint: bool = False) -> ModelBundle:
    """Resolve `--ckpt` (see the module docstring) and load it on the CPU in fp32. DeepSpeed
    checkpoints (pickles) need `trust_checkpoint`; exports never do."""
    from core.checkpoints import check_complete, find_latest_complete

    path = Path(ckpt)
    if not path.exists():
        raise CheckpointError(f"--ckpt {ckpt} does not exist")
    if path.is_file() or (path / EXPORT_WEIGHTS).is_file():
        return load_export(path)
    if any((path / name).exists() for name in ("checkpoints", "config.yaml", "export")):
        notes: list[str] = []
        latest = find_latest_complete(path, log=notes.append) if (path / "checkpoints").is_dir() else None
        export = path / "export"
        if (export / EXPORT_WEIGHTS).is_file():
            bundle = load_export(export)
            if latest is None or (bundle.step or -1) >= (_step_of(latest) or -1):
                return bundle
        if latest is None:
            why = "; ".join(notes) or f"no step_* directories in {path / 'checkpoints'}"
            raise CheckpointError(f"--ckpt {ckpt}: no complete checkpoint ({why}); wait for training to save "
                                  "one or pass an export directory")
        return consolidate(latest, path / "config.yaml", trust_checkpoint)
    why = check_complete(path)
    if why is None:
        return consolidate(path, path.parent.parent / "config.yaml", trust_checkpoint)
    raise CheckpointError(f"--ckpt {ckpt}: neither an export ({EXPORT_WEIGHTS} + {EXPORT_CONFIG}), a "
                          f"training output (checkpoints/) nor a complete checkpoint ({why})")
