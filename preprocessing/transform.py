"""The spatial transform shared by video frames and images (docs/method.md#prep): resize to cover W×H
keeping aspect, then centre-crop; uint8 in and out.

torch's uint8 channels-last antialiased bilinear kernel is vectorised and several times
faster than Pillow's resize on 32-frame clips; it also gives videos and images the same
filter. Scaling to [-1, 1] happens at encode time (`encode.Encoder.vae_latents`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from core.geometry import Crop


def _resize(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    if pixels.shape[1:3] == (height, width):
        return pixels
    if not pixels.flags.writeable:  # torch refuses read-only buffers (np.asarray of a PIL image)
        pixels = pixels.copy()
    x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2)  # NHWC = channels_last
    y = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return y.permute(0, 2, 3, 1).numpy()


def resize_cover(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """uint8 [N,h,w,3] -> uint8 [N,height,width,3]: resize to cover, centre crop (a view)."""
    if pixels.ndim != 4 or pixels.shape[-1] != 3 or pixels.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames [N,h,w,3], got {pixels.dtype} {pixels.shape}")
    h, w = pixels.shape[1:3]
    scale = max(width / w, height / h)
    rw, rh = max(width, round(w * scale)), max(height, round(h * scale))
    out = _resize(pixels, rw, rh)
    left, top = (rw - width) // 2, (rh - height) // 2
    return out[:, top : top + height, left : left + width]


def apply_crop(pixels: np.ndarray, crop: Crop) -> np.ndarray:
    """Full frames uint8 [N,src_h,src_w,3] -> uint8 [N,H,W,3] through the crop's source box."""
    x0, y0, x1, y1 = crop.box
    return np.ascontiguousarray(resize_cover(pixels[:, y0:y1, x0:x1], crop.width, crop.height))
