"""Pixels in and out of sampling and evaluation: MP4 (PyAV), GIF and contact sheets (Pillow),
reference images for image-to-video, and reading videos back."""

from __future__ import annotations

import math
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """Decoded video `[B,3,F,H,W]` in [-1, 1] -> uint8 frames `[B,F,H,W,3]`."""
    pixels = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 4, 1).cpu().numpy()


def _even(frames: np.ndarray) -> np.ndarray:
    """yuv420p needs even width and height: pad one edge row/column where odd."""
    h, w = frames.shape[1:3]
    pad = ((0, 0), (0, h % 2), (0, w % 2), (0, 0))
    return np.pad(frames, pad, mode="edge") if (h % 2 or w % 2) else frames


def write_mp4(frames: np.ndarray, path: str | Path, fps: float = 8.0, crf: int = 18) -> Path:
    """uint8 [F,H,W,3] -> H.264 MP4 (yuv420p, even dimensions) through PyAV."""
    frames = _even(np.asarray(frames, dtype=np.uint8))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=round(fps))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_gif(frames: np.ndarray, path: str | Path, fps: float = 8.0) -> Path:
    images = [Image.fromarray(f) for f in np.asarray(frames, dtype=np.uint8)]
    path = Path(path)
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    return path


def contact_sheet(frames: np.ndarray, path: str | Path, columns: int | None = None) -> Path:
    """All frames of a clip on one PNG grid, so a run can be judged without a video player."""
    frames = np.asarray(frames, dtype=np.uint8)
    n, h, w = frames.shape[:3]
    columns = columns or min(n, 8)
    rows = math.ceil(n / columns)
    sheet = np.full((rows * h + (rows - 1) * 2, columns * w + (columns - 1) * 2, 3), 255, np.uint8)
    for i, frame in enumerate(frames):
        r, c = divmod(i, columns)
        sheet[r * (h + 2) : r * (h + 2) + h, c * (w + 2) : c * (w + 2) + w] = frame
    Image.fromarray(sheet).save(path, format="PNG")
    return Path(path)


def read_video(path: str | Path) -> np.ndarray:
    """All frames of a video file as uint8 [F,H,W,3] (PyAV)."""
    try:
        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except (av.error.FFmpegError, OSError) as exc:
        raise ValueError(f"cannot read video {path}: {exc}") from exc
    if not frames:
        raise ValueError(f"video {path} has no frames")
    return np.stack(frames)


def load_image(path: str | Path, width: int, height: int) -> torch.Tensor:
    """[3,H,W] in [-1, 1]: resized to cover W×H keeping aspect, then centre-cropped (as
    preprocessing does)."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            pixels = np.array(ImageOps.fit(im, (width, height), Image.BICUBIC, centering=(0.5, 0.5)))
    except (FileNotFoundError, UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"--image {path}: cannot read it as an image ({exc}); pass a PNG/JPEG file") from exc
    return torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1
