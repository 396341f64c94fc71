"""Strict per-sample checks of format v1 against what `dataset.json` declares (docs/shard-format.md).

`SampleSpec.from_dataset` derives the exact member shapes from `dataset.json` (format version,
frame count, frame size, hence the latent shape); `check_sample` turns a `RawSample` into
arrays or raises `BadSample` with a stable reason code, so a reader can skip and count it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.shards.format import FORMAT_VERSION, load_npy
from core.shards.tar import RawSample

LATENT_CHANNELS = 4
LATENT_DOWNSAMPLE = 8  # SD VAEs: latents are 1/8 of the frame size
TEXT_TOKENS = 77
MAX_JSON_BYTES = 1 << 20
APPEARANCE_SLACK = 1e-3  # cosines of unit vectors in float32 overshoot 1 by rounding

# Stable reason codes of skipped samples (the keys of `bad_by_reason` in training metrics).
BAD_REASONS = (
    "member_too_large",
    "duplicate_member",
    "missing_member",
    "bad_npy",
    "bad_dtype",
    "bad_shape",
    "non_finite",
    "out_of_range",
    "bad_json",
    "json_too_large",
    "format_version",
    "bad_caption",
    "internal_error",  # a reader bug met on this sample: counted, never fatal
)


class BadSample(ValueError):
    def __init__(self, reason: str, detail: str):
        if reason not in BAD_REASONS:
            raise ValueError(f"unknown reason code {reason!r}; add it to BAD_REASONS")
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


class DatasetError(ValueError):
    """`dataset.json` is missing a field or cannot describe the shards."""


@dataclass(frozen=True)
class SampleSpec:
    """What every sample of one kind (`video` or `image`) must look like."""

    kind: str
    height: int  # latent h
    width: int  # latent w
    frames: int = 1  # F (video)
    text_dim: int | None = None  # width D of `.text.npy` [77,D]; None: tokens are refused
    max_json_bytes: int = MAX_JSON_BYTES

    @property
    def latent_shape(self) -> tuple[int, ...]:
        hw = (LATENT_CHANNELS, self.height, self.width)
        return (self.frames, *hw) if self.kind == "video" else hw

    @classmethod
    def from_dataset(cls, dataset: dict[str, Any], kind: str, text_dim: int | None = None) -> SampleSpec:
        """From a `dataset.json` document (its `output_config`); DatasetError names the field."""
        version = dataset.get("format_version")
        if version != FORMAT_VERSION:
            raise DatasetError(
                f"format_version is {version!r}, this code reads version {FORMAT_VERSION}; "
                "re-run prep or upgrade"
            )
        cfg = dataset.get("output_config") or dataset.get("config") or {}
        section = cfg.get(kind)
        if not isinstance(section, dict):
            raise DatasetError(f"output_config.{kind} is missing: cannot tell the {kind} latent shape")

        def field(name: str) -> int:
            value = section.get(name)
            if not isinstance(value, int) or value <= 0:
                raise DatasetError(f"output_config.{kind}.{name} must be a positive integer, got {value!r}")
            return value

        frames = field("frames") if kind == "video" else 1
        h, w = field("height"), field("width")
        if h % LATENT_DOWNSAMPLE or w % LATENT_DOWNSAMPLE:
            raise DatasetError(f"output_config.{kind}: {w}x{h} is not a multiple of {LATENT_DOWNSAMPLE}")
        return cls(kind, h // LATENT_DOWNSAMPLE, w // LATENT_DOWNSAMPLE, frames, text_dim)


def _array(raw: RawSample, ext: str, dtype: str, shape: tuple[int, ...], finite: bool = True) -> np.ndarray:
    data = raw.members.get(ext)
    if data is None:
        raise BadSample("missing_member", f"{raw.key}.{ext} is missing")
    try:
        arr = load_npy(data)
    except ValueError as err:
        raise BadSample("bad_npy", f"{raw.key}.{ext}: {err}") from None
    if arr.dtype != np.dtype(dtype):
        raise BadSample("bad_dtype", f"{raw.key}.{ext} is {arr.dtype}, format v1 says {dtype}")
    if arr.shape != shape:
        raise BadSample("bad_shape", f"{raw.key}.{ext} has shape {arr.shape}, dataset.json says {shape}")
    if finite and not np.isfinite(arr).all():
        raise BadSample("non_finite", f"{raw.key}.{ext} holds NaN or inf")
    return arr


def check_sample(raw: RawSample, spec: SampleSpec) -> dict[str, Any]:
    """Arrays and strings of one valid sample: key, meta, caption, latents, motion, appearance
    (video), text (or None). Raises BadSample with a stable reason code otherwise."""
    if raw.problem:
        raise BadSample(raw.problem, raw.detail)
    blob = raw.members.get("json")
    if blob is None:
        raise BadSample("missing_member", f"{raw.key}.json is missing")
    if len(blob) > spec.max_json_bytes:
        raise BadSample("json_too_large", f"{raw.key}.json is {len(blob)} bytes, cap {spec.max_json_bytes}")
    try:
        meta = json.loads(blob)
    except (ValueError, RecursionError) as err:
        raise BadSample("bad_json", f"{raw.key}.json: {type(err).__name__}") from None
    if not isinstance(meta, dict):
        raise BadSample("bad_json", f"{raw.key}.json is a {type(meta).__name__}, not an object")
    if meta.get("format_version") != FORMAT_VERSION:
        raise BadSample("format_version", f"{raw.key}: format_version {meta.get('format_version')!r}")
    if "txt" not in raw.members:
        raise BadSample("missing_member", f"{raw.key}.txt is missing")
    try:
        caption = raw.members["txt"].decode("utf-8")
    except UnicodeDecodeError:
        raise BadSample("bad_caption", f"{raw.key}.txt is not UTF-8") from None
    out: dict[str, Any] = {"key": raw.key, "meta": meta, "caption": caption}
    out["latents"] = _array(raw, "latents.npy", "float16", spec.latent_shape)
    if spec.kind == "video":
        f = spec.frames
        out["motion"] = _array(raw, "motion.npy", "float32", (f - 1,))
        appearance = _array(raw, "appearance.npy", "float32", (f, f))
        if np.abs(appearance).max() > 1.0 + APPEARANCE_SLACK:
            raise BadSample("out_of_range", f"{raw.key}.appearance.npy has cosines outside [-1, 1]")
        out["appearance"] = appearance
    out["text"] = None
    if "text.npy" in raw.members:
        if spec.text_dim is None:
            raise BadSample("bad_shape", f"{raw.key}.text.npy present but this job takes no text tokens")
        out["text"] = _array(raw, "text.npy", "float16", (TEXT_TOKENS, spec.text_dim))
    return out
