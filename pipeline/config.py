"""`PrepConfig`: everything `python -m pipeline.prep` reads from `configs/prep/*.yaml` and
`section.field=value` overrides.

Sections `video`, `image`, `models` are the per-sample settings of `preprocessing.settings`;
the others belong to the job: which manifest columns to read, how to spread the work over a
Ray cluster, how to download media, how to reach object stores.

The config fingerprint (`prep_fingerprint`) covers only what changes the bytes of a shard
(frame size, models, shard size, columns...). Operational knobs (workers, timeouts, HTTP
retries, storage credentials) are left out so a resumed job may tune them freely.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from core.config import check, to_dict
from core.shard_format import FORMAT_VERSION, STATUS_COLUMNS
from pipeline.untrusted import (
    DEFAULT_BLOCKED_NETWORKS,
    DEFAULT_DISALLOWED_DIRECTIVES,
    DEFAULT_PROTOCOLS,
    DEFAULT_REDACT_PARAMS,
    parse_network,
)
from preprocessing.filters import FilterConfig
from preprocessing.settings import ImageConfig, ModelsConfig, VideoConfig


def check_strings(values: Any, name: str, what: str) -> None:
    """A YAML list of non-empty strings (`[a, b]`); a lone string is refused, not split."""
    check(
        isinstance(values, list) and all(isinstance(v, str) and v.strip() for v in values),
        name,
        f"must be a list of {what}, got {values!r}",
    )


# Fallback column names, tried in order when the configured column is absent:
# LAION parquet calls the image URL `URL` and the caption `TEXT`.
COLUMN_ALIASES = {
    "image_column": ("URL", "url"),
    "caption_column": ("TEXT", "text"),
    "video_column": (),
}


def check_filter_fields(cfg: Any) -> None:
    """`manifest.filter` and `manifest.extra_columns` (their columns are checked against each
    manifest file when it is opened: pipeline/filters.py)."""
    check(
        cfg.filter is None or (isinstance(cfg.filter, str) and cfg.filter.strip() != ""),
        "filter",
        f"must be null or a SQL expression such as `punsafe < 0.5 and WIDTH >= 256`, got {cfg.filter!r}",
    )
    if cfg.extra_columns:
        check_strings(cfg.extra_columns, "extra_columns", "manifest column names")
    check(isinstance(cfg.extra_columns, list), "extra_columns", "must be a list of column names")
    taken = [c for c in cfg.extra_columns if c in STATUS_COLUMNS]
    check(
        not taken,
        "extra_columns",
        f"{taken[:1]} would overwrite the status table's own column of that name; "
        "rename the manifest column",
    )
    check(
        len(set(cfg.extra_columns)) == len(cfg.extra_columns),
        "extra_columns",
        f"lists a column twice: {cfg.extra_columns!r}",
    )


@dataclass
class ManifestConfig:
    video_column: str = "video"  # path or URL of the video file
    image_column: str = "image"  # path or URL of the image (LAION: `URL`, found automatically)
    caption_column: str = "caption"  # LAION: `TEXT`, found automatically
    batch_rows: int = 65_536  # rows per Arrow batch while streaming a manifest (driver memory)
    # Untrusted manifests (docs/untrusted.md). Folders local paths must resolve into (realpath);
    # null = a local manifest's own folder, nothing for a remote manifest; [] = no local files.
    allowed_roots: list[str] | None = None
    allowed_protocols: list[str] = field(default_factory=lambda: list(DEFAULT_PROTOCOLS))
    # Query parameters shown as REDACTED in stored URLs and messages; keys hash the redacted URL.
    redact_query_params: list[str] = field(default_factory=lambda: list(DEFAULT_REDACT_PARAMS))
    # Row filter (pipeline/filters.py): a DuckDB SQL expression over manifest columns, e.g.
    # `punsafe < 0.5 and WIDTH >= 256`; rows it rejects fail with reason `filtered`. null = all.
    filter: str | None = None
    # Manifest columns copied into KEY.json (`extra`) and the status table, as img2dataset's
    # save_additional_columns does.
    extra_columns: list[str] = field(default_factory=list)
    # Clip spans (pipeline/clips.py; Panda-70M and InternVid are detected from their columns):
    # one clip a row (start/end columns) or a list of [start, end] per row; seconds or H:MM:SS.fff.
    start_column: str | None = None
    end_column: str | None = None
    clips_column: str | None = None
    # The video's path or URL from the row's columns, e.g. /data/internvid/{YoutubeID}.mp4.
    source_template: str | None = None

    def __post_init__(self) -> None:
        check_filter_fields(self)
        self._check_clips()
        for name in ("video_column", "image_column", "caption_column"):
            value = getattr(self, name)
            check(isinstance(value, str) and value != "", name, "must be a non-empty column name")
        check(
            isinstance(self.batch_rows, int) and self.batch_rows >= 1,
            "batch_rows",
            f"must be an integer >= 1, got {self.batch_rows!r}",
        )
        if self.allowed_roots is not None:
            check_strings(self.allowed_roots, "allowed_roots", "folders")
            for root in self.allowed_roots:
                check(
                    "://" not in root and os.path.isabs(os.path.expanduser(root)),
                    "allowed_roots",
                    f"{root!r} is not an absolute local folder (write e.g. [/data/media])",
                )
        check_strings(self.allowed_protocols, "allowed_protocols", "fsspec protocol names")
        for protocol in self.allowed_protocols:
            check(
                protocol.isascii() and protocol == protocol.lower() and "://" not in protocol,
                "allowed_protocols",
                f"{protocol!r} is not a protocol name (write e.g. [http, https])",
            )
        check_strings(self.redact_query_params, "redact_query_params", "query parameter names")

    def _check_clips(self) -> None:
        from pipeline.clips import template_fields

        for name in ("start_column", "end_column", "clips_column", "source_template"):
            value = getattr(self, name)
            check(value is None or (isinstance(value, str) and value.strip() != ""), name,
                  f"must be a column name (or null), got {value!r}")
        check((self.start_column is None) == (self.end_column is None),
              "start_column" if self.start_column is None else "end_column",
              "start_column and end_column go together (one clip a row); set both")
        check(self.clips_column is None or self.start_column is None, "clips_column",
              "set either clips_column (a list of spans a row) or start_column/end_column, not both")
        if self.source_template is not None:
            try:
                template_fields(self.source_template)
            except ValueError as exc:
                check(False, "source_template", f"{self.source_template!r}: {exc}")


@dataclass
class ExecutionConfig:
    # Shard tasks in flight at once. Each one decodes on `cpus_per_worker` CPUs; 0 = as many as
    # the cluster's CPUs allow (minus the CPUs reserved by encoder actors).
    workers: int = 0
    cpus_per_worker: float = 1.0
    # Encoder actors (VAE + semantic model). -1 = auto: one per `gpus_per_encoder` share of the
    # cluster's GPUs, or 0 on a CPU-only cluster. 0 = encode inside each shard task.
    encoders: int = -1
    gpus_per_encoder: float = 0.5  # fractional GPUs per encoder actor; 0 = CPU actors
    cpus_per_encoder: float = 1.0  # CPUs reserved per encoder actor (torch threads on CPU)
    batches_in_flight: int = 2  # encode batches a shard task keeps queued at the actors
    encoder_concurrency: int = 2  # encode calls an actor runs at once (copies overlap compute)
    local_cpus: int = 0  # CPUs of the local cluster started without RAY_ADDRESS; 0 = all
    progress: bool = True  # tqdm bar of shards and samples/s on stderr
    # A second job on the same output refuses unless the holder's heartbeat is older than this.
    lease_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        check(
            isinstance(self.workers, int) and self.workers >= 0,
            "workers",
            f"must be an integer >= 0 (0 = from the cluster's CPUs), got {self.workers!r}",
        )
        for name in ("cpus_per_worker", "cpus_per_encoder", "gpus_per_encoder"):
            value = getattr(self, name)
            check(
                isinstance(value, (int, float)) and math.isfinite(value) and value >= 0,
                f"{name}",
                f"must be a number >= 0, got {value!r}",
            )
        check(
            self.cpus_per_worker > 0, "cpus_per_worker", "must be > 0 (shard tasks decode on CPU)"
        )
        check(
            self.gpus_per_encoder <= 1 or float(self.gpus_per_encoder).is_integer(),
            "gpus_per_encoder",
            f"fractions must be <= 1 (Ray packs several actors on one GPU), got {self.gpus_per_encoder}",
        )
        check(
            isinstance(self.encoders, int) and self.encoders >= -1,
            "encoders",
            f"must be -1 (auto), 0 (encode in the shard tasks) or a number of actors, got {self.encoders!r}",
        )
        check(
            isinstance(self.batches_in_flight, int) and self.batches_in_flight >= 1,
            "batches_in_flight",
            f"must be an integer >= 1, got {self.batches_in_flight!r}",
        )
        check(
            isinstance(self.lease_timeout_s, (int, float)) and self.lease_timeout_s > 0,
            "lease_timeout_s",
            f"must be a number of seconds > 0, got {self.lease_timeout_s!r}",
        )
        check(
            isinstance(self.encoder_concurrency, int) and 1 <= self.encoder_concurrency <= 8,
            "encoder_concurrency",
            f"must be an integer from 1 to 8 (2-3 keep a GPU busy), got {self.encoder_concurrency!r}",
        )
        check(
            isinstance(self.local_cpus, int) and self.local_cpus >= 0,
            "local_cpus",
            f"must be an integer >= 0, got {self.local_cpus!r}",
        )


@dataclass
class HttpConfig:
    # The whole download (connect, headers, body) of one attempt; a slower one fails `timeout`.
    timeout_s: float = 30.0
    retries: int = 3  # extra attempts after 5xx, 429, connection errors and timeouts
    backoff_s: float = 0.5  # first retry delay; doubles per attempt, with +-50% jitter
    max_backoff_s: float = 30.0
    max_concurrency: int = 16  # downloads in flight per shard task (also the prefetch window)
    max_bytes: int = 1 << 30  # larger media fail with `too_large`
    # Bytes of remote media one shard task holds in RAM (downloading or waiting to be decoded);
    # bodies over spill_bytes, or past the budget, stream to a temp file under spill_dir ("" =
    # the system temp folder) that the decoder opens by path (pipeline/prefetch.py).
    prefetch_bytes: int = 256 << 20
    spill_bytes: int = 32 << 20
    spill_dir: str = ""
    user_agent: str = "higen-prep/0.1 (+https://github.com/higen)"
    # X-Robots-Tag lines addressed to this token (`higen-prep: noai`) apply to us.
    user_agent_token: str = "higen-prep"
    max_redirects: int = 10
    # Untrusted manifests (docs/untrusted.md): media URLs may not reach these addresses (checked
    # after DNS, on every redirect hop, against the address connected) -> `blocked_address`.
    blocked_networks: list[str] = field(default_factory=lambda: list(DEFAULT_BLOCKED_NETWORKS))
    allowed_networks: list[str] = field(default_factory=list)  # exceptions to blocked_networks
    # A reply whose X-Robots-Tag has one of these directives fails `opted_out`; [] = ignore.
    disallowed_header_directives: list[str] = field(
        default_factory=lambda: list(DEFAULT_DISALLOWED_DIRECTIVES)
    )

    def __post_init__(self) -> None:
        for name in ("timeout_s", "backoff_s", "max_backoff_s"):
            value = getattr(self, name)
            check(
                isinstance(value, (int, float)) and value > 0,
                name,
                f"must be > 0 seconds, got {value!r}",
            )
        for name, low in (("retries", 0), ("max_concurrency", 1), ("max_bytes", 1), ("max_redirects", 0),
                          ("prefetch_bytes", 1), ("spill_bytes", 0)):
            value = getattr(self, name)
            check(
                isinstance(value, int) and not isinstance(value, bool) and value >= low,
                name,
                f"must be an integer >= {low}, got {value!r}",
            )
        check(
            isinstance(self.user_agent_token, str) and self.user_agent_token.strip() != "",
            "user_agent_token",
            "must be a non-empty token (the name X-Robots-Tag lines address, e.g. higen-prep)",
        )
        for name in ("blocked_networks", "allowed_networks"):
            values = getattr(self, name)
            check_strings(values, name, "CIDR networks")
            for value in values:
                try:
                    parse_network(value)
                except ValueError as exc:
                    check(False, name, str(exc))
        check_strings(self.disallowed_header_directives, "disallowed_header_directives", "directives")
        check(self.spill_bytes <= self.prefetch_bytes, "spill_bytes",
              f"must be <= http.prefetch_bytes={self.prefetch_bytes} (a file kept in RAM must fit the "
              f"budget), got {self.spill_bytes}")
        check(isinstance(self.spill_dir, str), "spill_dir", "must be a local folder path or ''")


@dataclass
class StorageConfig:
    # fsspec storage options for every URL the job touches (manifests, media, output), e.g.
    # {endpoint_url: http://minio:9000} for s3://. Credentials are better left to the standard
    # AWS_* variables / ~/.aws; values here are never written to the outputs.
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check(
            isinstance(self.options, dict),
            "options",
            f"must be a mapping of fsspec storage options, got {type(self.options).__name__}",
        )


@dataclass
class PrepConfig:
    video: VideoConfig = field(default_factory=VideoConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    manifest: ManifestConfig = field(default_factory=ManifestConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    samples_per_shard: int = 1000  # shard N holds manifest rows N*S .. N*S+S-1
    # `source`: a source repeated later in the manifest fails `duplicate` (a distributed pass,
    # pipeline/dedupe.py); `none`: only repeats within one shard do. Changes shard bytes.
    dedupe: str = "source"

    def __post_init__(self) -> None:
        check(
            isinstance(self.samples_per_shard, int) and self.samples_per_shard >= 1,
            "samples_per_shard",
            f"must be an integer >= 1, got {self.samples_per_shard!r}",
        )
        check(self.dedupe in ("source", "none"), "dedupe", f"must be source or none, got {self.dedupe!r}")


# Fields that never change a shard's bytes: excluded from the fingerprint.
OPERATIONAL = {
    "execution": None,
    "http": None,
    "storage": None,
    # Which rows may be read is policy, not encoding: widening it then --retry-failed must work.
    "manifest": ("batch_rows", "allowed_roots", "allowed_protocols"),
    "models": ("device", "batch_size", "batch_frames"),
    # The decoder backends agree to within 2/255 per pixel; each sample's KEY.json names its own.
    "video": ("decode_timeout_s", "decode_memory_mb", "decoder_recycle_every", "decoder"),
}


# Fields added after datasets were written: they enter the fingerprint only when set, so an
# existing dataset (written before they existed, i.e. with their defaults) keeps its fingerprint.
SINCE_ADDED = {
    "filter": None,
    "manifest": ("filter", "extra_columns", "start_column", "end_column", "clips_column", "source_template"),
    "video": ("split", "clip_seconds", "min_clip_s", "max_clip_s", "scene_threshold"),
    "dedupe": None,  # `source` is what every earlier run did
}


def output_config(cfg: PrepConfig) -> dict[str, Any]:
    """The config values that determine the output (what the fingerprint hashes)."""
    data = to_dict(cfg)
    for section, fields in OPERATIONAL.items():
        if fields is None:
            data.pop(section)
        else:
            for name in fields:
                data[section].pop(name)
    _drop_defaults(data)
    data["format_version"] = FORMAT_VERSION
    return data


def _drop_defaults(data: dict[str, Any]) -> None:
    """Remove the `SINCE_ADDED` fields (or whole sections) that hold their default values."""
    defaults = to_dict(PrepConfig())
    for section, fields in SINCE_ADDED.items():
        if section not in data:
            continue
        if fields is None:
            if data[section] == defaults[section]:
                data.pop(section)
            continue
        for name in fields:
            if name in data[section] and data[section][name] == defaults[section][name]:
                data[section].pop(name)


def prep_fingerprint(cfg: PrepConfig) -> str:
    blob = json.dumps(output_config(cfg), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def public_config(cfg: PrepConfig) -> dict[str, Any]:
    """The whole config for `dataset.json`, without storage options (they may hold secrets)."""
    data = to_dict(cfg)
    data["storage"] = {"options": sorted(cfg.storage.options)}
    return data
