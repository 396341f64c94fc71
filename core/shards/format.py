"""Shard format v1 (docs/shard-format.md), the writing side: keys, member names and bytes, reason codes.

Change only with a `FORMAT_VERSION` bump. Everything here is plain numpy/json so that stock
`webdataset` and `ray.data.read_webdataset` read the shards without project code. Reading
(tar safety limits, per-sample validation) lives next door in `tar.py` and `validate.py`.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FORMAT_VERSION = 1

# Stable failure reason codes (the `reason` column of the status parquet).
REASONS = (
    "missing_file",
    "empty_file",
    "decode_error",
    "decoder_crash",
    "timeout",
    "out_of_memory",
    "no_video_stream",
    "too_short",
    "bad_image",
    "image_bomb",
    "bad_caption",
    "duplicate",
    "download_error",  # transient: 5xx, 429, connection errors, after http.retries
    "not_found",  # 404 / 410: the URL names nothing
    "http_error",  # another refused request (403, 400, TLS certificate, bad URL, redirect loop)
    "too_large",  # over http.max_bytes
    "encode_error",
    "internal_error",
    "forbidden_path",  # untrusted manifests (docs/untrusted.md): a protocol or folder not allowed
    "blocked_address",  # ... an internal network address (http.blocked_networks)
    "opted_out",  # ... the server's X-Robots-Tag forbids this use (noai, ...)
    "bad_span",  # a clip span that does not parse, has start >= end, or ends past the video
    # Rejected by the job's filters (`manifest.filter`, `filter.*`; preprocessing/filters.py)
    "filtered",  # the row fails the manifest.filter expression
    "too_small",  # short side under filter.min_short_side
    "bad_aspect",  # aspect ratio over filter.max_aspect
    "bad_duration",  # duration outside filter.min_duration_s .. filter.max_duration_s
    "static",  # mean motion factor under filter.min_motion
    "scene_cut",  # one frame pair's motion over filter.max_motion_jump x the clip's median
)

# Failures that say nothing about the data: the network, a machine, our own code. Plain
# `--retry-failed` redoes these; `--retry-failed=all` redoes every failure. (An encoder actor
# that dies or a storage error never becomes a row failure: the shard task raises and Ray
# retries it.)
TRANSIENT_REASONS = frozenset({"timeout", "download_error", "encode_error", "internal_error"})
# Refusals by the job's own rules (docs/untrusted.md): plain `--retry-failed` redoes them too,
# since the rule may have been widened since; they cost no download when still refused.
POLICY_REASONS = frozenset({"forbidden_path", "blocked_address", "opted_out"})
PERMANENT_REASONS = frozenset(REASONS) - TRANSIENT_REASONS - POLICY_REASONS

# The status parquet, one row per sample (a clip of a manifest row, or the row itself): name ->
# Arrow type name. Columns past `detail` are null where unknown (a failed row has no motion).
# `pipeline.config.ManifestConfig.extra_columns` add manifest columns after these, as read.
STATUS_FIELDS = (
    ("key", "string"),
    ("source", "string"),
    ("caption", "string"),
    ("status", "string"),
    ("reason", "string"),
    ("detail", "string"),
    ("shard", "int64"),  # shard index
    ("row", "int64"),  # manifest row (of the concatenated manifest)
    ("clip_start", "float64"),  # clip span in seconds, where the row has spans
    ("clip_end", "float64"),
    ("motion_mean", "float64"),  # mean raw motion factor of the clip
    ("appearance_factor", "float64"),  # γa = 1 - A[0, F-1] of the clip's DINO matrix, as KEY.json
    ("width", "int64"),  # source frame size
    ("height", "int64"),
    ("duration", "float64"),  # source duration in seconds
)
STATUS_COLUMNS = tuple(name for name, _ in STATUS_FIELDS)


class SampleError(Exception):
    """One sample failed; `reason` is a stable code from REASONS, `detail` names the file.

    `meta`: what was learnt of the source before it failed (status columns such as `width`,
    `height`, `duration`: a too-short video knows its length)."""

    def __init__(self, reason: str, detail: str, meta: dict[str, Any] | None = None):
        if reason not in REASONS:
            raise ValueError(f"unknown reason code {reason!r}; add it to shard_format.REASONS")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.meta = dict(meta or {})


def shard_name(index: int) -> str:
    return f"{index:06d}"


def sample_key(source: str, span: tuple[float, float] | None = None) -> str:
    """Deterministic key: hex digest of the source URI (and clip span). No dots, no slashes.

    A span is written in milliseconds (`SRC#1.500-4.000`), so `1.5`, `"0:00:01.5"` and a
    parquet double 1.5 name the same clip; span None gives the whole-video key of before."""
    text = source if span is None else f"{source}#{float(span[0]):.3f}-{float(span[1]):.3f}"
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:24]


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def load_npy(data: bytes) -> np.ndarray:
    """Read a `.npy` member; pickled object arrays are refused (shards may be hostile).

    The header is checked against the payload before numpy allocates anything: a 100-byte
    member whose header claims a 10**12-element array must fail, not allocate.
    """
    buf = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buf)
        fmt = np.lib.format
        read_header = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}
        shape, _, dtype = read_header[version](buf)
    except Exception as err:  # noqa: BLE001 - any malformed header is the same bad member
        raise ValueError(f"not a .npy array ({err})") from None
    if dtype.hasobject:
        raise ValueError("object arrays (pickles) are refused")
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if count * dtype.itemsize != len(data) - buf.tell():
        raise ValueError(f"header says {shape} {dtype} but the member holds {len(data) - buf.tell()} bytes")
    return np.load(io.BytesIO(data), allow_pickle=False)


@dataclass
class SampleRecord:
    """One successful sample, ready to become the members of docs/shard-format.md."""

    key: str
    caption: str
    latents: np.ndarray  # float16 [F,4,h,w] (video) or [4,h,w] (image)
    meta: dict[str, Any]
    motion: np.ndarray | None = None  # float32 [F-1]
    appearance: np.ndarray | None = None  # float32 [F,F]
    text: np.ndarray | None = None  # float16 [77,D]
    extra: dict[str, bytes] = field(default_factory=dict)

    def members(self) -> list[tuple[str, bytes]]:
        """(member name, bytes) in a fixed order: reruns give byte-identical tars."""
        if "." in self.key or "/" in self.key:
            raise ValueError(f"sample key {self.key!r} must not contain dots or slashes")
        meta = dict(self.meta, format_version=FORMAT_VERSION)
        out = [
            (f"{self.key}.json", json.dumps(meta, sort_keys=True).encode("utf-8")),
            (f"{self.key}.latents.npy", npy_bytes(self.latents.astype(np.float16))),
        ]
        if self.motion is not None:
            out.append((f"{self.key}.motion.npy", npy_bytes(self.motion.astype(np.float32))))
        if self.appearance is not None:
            out.append((f"{self.key}.appearance.npy", npy_bytes(self.appearance.astype(np.float32))))
        if self.text is not None:
            out.append((f"{self.key}.text.npy", npy_bytes(self.text.astype(np.float16))))
        out.append((f"{self.key}.txt", self.caption.encode("utf-8")))
        return out


def decode_members(sample: dict[str, Any]) -> dict[str, Any]:
    """Decode a webdataset sample dict (raw bytes per extension) into arrays and strings.

    Raises ValueError naming the key on an unknown `format_version`.
    """
    out: dict[str, Any] = {"__key__": sample.get("__key__")}
    for ext, value in sample.items():
        if ext.startswith("__"):
            out[ext] = value
        elif ext.endswith("npy"):
            out[ext[:-4] if ext.endswith(".npy") else ext] = load_npy(value)
        elif ext == "txt":
            out["txt"] = value.decode("utf-8") if isinstance(value, bytes) else value
        elif ext == "json":
            out["json"] = json.loads(value) if isinstance(value, (bytes, str)) else value
    version = out.get("json", {}).get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"sample {out['__key__']}: shard format_version {version!r} is not supported "
            f"(this code reads version {FORMAT_VERSION}); re-run preprocessing or upgrade"
        )
    return out
