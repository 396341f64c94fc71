"""`Encoder`: decoded pixels -> `SampleRecord` (docs/shard-format.md).

Frames of a whole batch of samples are pooled and pushed through the VAE and the semantic
model in chunks of `models.batch_size` frames, so memory is bounded by the chunk, not by the
batch or by F. Latents are the posterior **mean** × the VAE's scaling factor, stored float16;
motion factors and the appearance matrix are computed in float32/float64 (`factors.py`).
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import torch

from core.encoders import TextEncoder, load_vae
from core.semantic import SemanticModel
from core.shard_format import SampleError, SampleRecord
from preprocessing.factors import appearance_factor, appearance_matrix, motion_factors
from preprocessing.settings import ModelsConfig


class PinnedStaging:
    """Two page-locked host buffers per thread, used in turn, so the copy of chunk k+1 to the GPU
    (non-blocking, from pinned memory) overlaps the forward pass of chunk k. A buffer is reused
    only after the event recorded behind its last copy has fired."""

    def __init__(self) -> None:
        self._local = threading.local()

    def to_device(self, chunk: torch.Tensor, device: str) -> torch.Tensor:
        slots = getattr(self._local, "slots", None)
        if slots is None:
            slots = self._local.slots = [[None, None], [None, None]]  # [buffer, event]
            self._local.turn = 0
        slot = slots[self._local.turn]
        self._local.turn ^= 1
        n = chunk.numel()
        if slot[1] is not None:
            slot[1].synchronize()
        if slot[0] is None or slot[0].numel() < n:
            slot[0] = torch.empty(n, dtype=chunk.dtype).pin_memory()
        host = slot[0][:n].view(chunk.shape)
        host.copy_(chunk)
        out = host.to(device, non_blocking=True)
        slot[1] = torch.cuda.Event()
        slot[1].record()
        return out


class Encoder:
    """Holds the frozen models of one worker; `encode` turns a batch of `Decoded` into records."""

    def __init__(self, models: ModelsConfig, local_paths: dict[str, str] | None = None):
        """`local_paths`: local copies of hub models that the driver fetched once (`vae`: a
        diffusers folder, `semantic_checkpoint`: a weights file); ids in the shards stay the
        configured ones, so a shard does not depend on where the copy lay."""
        local = local_paths or {}
        self.cfg = models
        self.device = models.resolved_device()
        self.dtype = models.resolved_dtype()
        self.vae = load_vae(local.get("vae", models.vae), self.device, self.dtype)
        self.scaling_factor = float(self.vae.config.scaling_factor)
        checkpoint = local.get("semantic_checkpoint", models.semantic_checkpoint)
        self.semantic = SemanticModel(models.semantic, checkpoint, self.device, self.dtype)
        if checkpoint != models.semantic_checkpoint:
            self.semantic.model_id = SemanticModel.id_for(models.semantic, models.semantic_checkpoint)
        self.text = TextEncoder(models.text, self.device) if models.text else None
        self._staging = PinnedStaging() if self.device.startswith("cuda") else None

    @property
    def model_ids(self) -> dict[str, Any]:
        return {
            "vae": self.cfg.vae,
            "vae_scaling_factor": self.scaling_factor,
            "semantic": self.semantic.model_id,
            "text": self.cfg.text,
            "dtype": str(self.dtype).replace("torch.", ""),
        }

    # -- model passes over pooled, chunked frames -------------------------------------------
    def _chunks(self, frames):
        """Chunks of `batch_size` frames as tensors: numpy (decoded on CPU) or already a tensor
        (decoded on the GPU by `gpu_decode`); CPU chunks reach a GPU through pinned buffers."""
        for i in range(0, len(frames), self.cfg.batch_size):
            part = frames[i : i + self.cfg.batch_size]
            chunk = part if isinstance(part, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(part))
            if self._staging is not None and chunk.device.type == "cpu":
                chunk = self._staging.to_device(chunk, self.device)
            yield chunk

    @torch.inference_mode()
    def vae_latents(self, frames) -> np.ndarray:
        """uint8 [N,H,W,3] -> float32 scaled posterior means [N,4,H/8,W/8]."""
        out = []
        for chunk in self._chunks(frames):
            # scale to [-1, 1] in float32, then cast: bf16 arithmetic would round 255 levels coarsely
            x = (chunk.to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1.0).to(self.dtype)
            mean = self.vae.encode(x).latent_dist.mean
            out.append((mean.float() * self.scaling_factor).cpu().numpy())
        return np.concatenate(out)

    def semantic_features(self, frames) -> np.ndarray:
        return np.concatenate([self.semantic(chunk).cpu().numpy() for chunk in self._chunks(frames)])

    # -- one batch of samples ----------------------------------------------------------------
    def encode(self, batch: list) -> list[SampleRecord | SampleError]:
        """One result per input, in order. A model failure on a pooled pass is retried
        sample by sample, so one bad sample costs only itself (`encode_error`)."""
        if not batch:
            return []
        groups: dict[tuple, list[int]] = {}
        for i, d in enumerate(batch):
            groups.setdefault((d.kind, tuple(d.pixels.shape[-3:])), []).append(i)
        results: list[Any] = [None] * len(batch)
        for members in groups.values():
            try:
                for i, rec in zip(members, self._encode_group([batch[i] for i in members])):
                    results[i] = rec
            except Exception:
                if len(members) == 1:
                    results[members[0]] = self._failed(batch[members[0]])
                    continue
                for i in members:
                    try:
                        results[i] = self._encode_group([batch[i]])[0]
                    except Exception:
                        results[i] = self._failed(batch[i])
        return results

    def _failed(self, d) -> SampleError:
        import traceback

        last = traceback.format_exc().strip().splitlines()[-1]
        return SampleError("encode_error", f"{d.source}: encoding failed: {last[:300]}")

    def _encode_group(self, batch: list) -> list[SampleRecord]:
        """Samples of one kind and one frame size: pool frames, run models, split back."""
        video = batch[0].kind == "video"
        frames = _pool([d.pixels if video else d.pixels[None] for d in batch])
        latents = self.vae_latents(frames)
        features = self.semantic_features(frames) if video else None
        texts = self._text([d.caption for d in batch]) if self.text is not None else [None] * len(batch)
        records, start = [], 0
        for d, text in zip(batch, texts):
            n = d.pixels.shape[0] if video else 1
            z = latents[start : start + n]
            meta = dict(d.meta, key=d.key, models=self.model_ids)
            if video:
                feats = features[start : start + n]
                appearance = appearance_matrix(feats)
                motion = motion_factors(z)
                meta.update(appearance_factor=appearance_factor(appearance),
                            motion_mean=float(motion.mean()))
                rec = SampleRecord(d.key, d.caption, z.astype(np.float16), meta, motion=motion,
                                   appearance=appearance, text=text)
            else:
                rec = SampleRecord(d.key, d.caption, z[0].astype(np.float16), meta, text=text)
            records.append(rec)
            start += n
        return records

    @torch.inference_mode()
    def _text(self, captions: list[str]) -> list[np.ndarray]:
        out = []
        for i in range(0, len(captions), self.cfg.batch_size):
            tokens = self.text(captions[i : i + self.cfg.batch_size])
            out.extend(t.to(torch.float16).cpu().numpy() for t in tokens)
        return out



def _pool(parts: list):
    """Concatenate frames of several samples: numpy when all are numpy, else one device tensor."""
    if all(isinstance(p, np.ndarray) for p in parts):
        return np.concatenate(parts)
    device = next(p.device for p in parts if isinstance(p, torch.Tensor))
    return torch.cat([torch.as_tensor(p).to(device) for p in parts])
