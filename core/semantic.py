"""The semantic image model Ω of the appearance matrix (docs/method.md#prep): one feature vector per frame.

Specs (ModelsConfig.semantic):
- `timm:NAME` — a timm model; DINOv2 ViT-S/14 (`timm:vit_small_patch14_dinov2`) by default,
  CLS feature at 224×224. Weights come from `semantic_checkpoint` (a local file) when set,
  else from timm's pretrained source (hub; needs network or a warm cache).
- `tiny` — the same timm architecture shrunk (56 px, width 64, depth 2), seeded random, its
  feature the mean patch token: a random ViT's CLS token is mostly its own initial value.
- `open_clip:ARCH:TAG` — an OpenCLIP image tower (the released code's choice), via
  `core.encoders.load_clip`; its own input size and normalisation.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from core.encoders import TINY_SEED, load_clip

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINO_SIZE = 224
# LayerScale 1.0 in the tiny model: DINOv2's init_values=1e-5 makes a *random* ViT output an
# almost input-independent CLS token, so every appearance matrix would be all ones.
# Mean patch token, not CLS: a random CLS token attends almost uniformly and carries mostly its
# own init, so colour drifts moved it little and unevenly (synthetic drift clips: correlation of
# appearance change with drift 0.61 for CLS, 0.70 for the mean token, 3x larger changes).
TINY_TIMM = dict(img_size=56, embed_dim=64, depth=2, num_heads=2, init_values=1.0, global_pool="avg")


def _load_state_dict(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"models.semantic_checkpoint {path} does not exist; give a local weights file"
        )
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    return state


class SemanticModel(torch.nn.Module):
    """frames uint8 [N,H,W,3] -> float32 features [N,D] (centre square crop, resize, normalise)."""

    def __init__(self, spec: str, checkpoint: str | None = None, device: str = "cpu",
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.spec = spec
        self.model_id = self.id_for(spec, checkpoint)
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        if spec.startswith("open_clip:"):
            if checkpoint is not None:
                raise ValueError("models.semantic_checkpoint is for timm models; give open_clip weights as "
                                 "open_clip:ARCH:/path/to/weights.pt")
            clip, _, self.size = load_clip(spec[len("open_clip:"):])
            self.net = clip.visual
            from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

            pp = getattr(self.net, "preprocess_cfg", None) or {}  # set by open_clip.create_model
            mean = tuple(pp.get("mean", OPENAI_DATASET_MEAN))
            std = tuple(pp.get("std", OPENAI_DATASET_STD))
            self._features = self.net
        else:
            self.net, self.size = self._timm(spec, checkpoint)
            self._features = self.net  # num_classes=0: forward() returns the pooled CLS token
        self.net.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(mean, device=device).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, device=device).view(1, 3, 1, 1), persistent=False)
        self.dtype = dtype

    @staticmethod
    def id_for(spec: str, checkpoint: str | None) -> str:
        """The id recorded in shards: the spec, and the weights file when one was configured."""
        return spec if checkpoint is None else f"{spec}@{os.path.abspath(checkpoint)}"

    @staticmethod
    def _timm(spec: str, checkpoint: str | None):
        import timm

        if spec == "tiny":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(TINY_SEED)
                net = timm.create_model(
                    "vit_small_patch14_dinov2", pretrained=False, num_classes=0, **TINY_TIMM
                )
        else:
            name = spec[len("timm:"):]
            kwargs = {"num_classes": 0}
            if "dinov2" in name:
                kwargs["img_size"] = DINO_SIZE
            if checkpoint is None:
                net = timm.create_model(name, pretrained=True, **kwargs)
            else:
                # timm's own loader: strips classifier keys and resamples position embeddings.
                net = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": checkpoint},
                                        **kwargs)
        if spec == "tiny" and checkpoint is not None:
            net.load_state_dict(_load_state_dict(checkpoint))
        size = net.patch_embed.img_size if hasattr(net, "patch_embed") else DINO_SIZE
        return net, int(size[0] if isinstance(size, (tuple, list)) else size)

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 [N,H,W,3] -> normalised [N,3,S,S]: centre square crop, antialiased resize."""
        x = frames.to(self.mean.device).permute(0, 3, 1, 2).float() / 255.0
        h, w = x.shape[-2:]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        x = x[..., top : top + side, left : left + side]
        if side != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", antialias=True)
        x = (x.clamp(0, 1) - self.mean) / self.std
        return x.to(self.dtype)

    @torch.inference_mode()
    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        out = self._features(self.preprocess(frames))
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.float()
