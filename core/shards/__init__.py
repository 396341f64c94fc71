"""Shard format v1 (docs/shard-format.md), its one owner: writing (`format`), safe tar reading (`tar`) and
per-sample validation against `dataset.json` (`validate`). Imports nothing of ours."""

from core.shards.format import (
    FORMAT_VERSION,
    PERMANENT_REASONS,
    POLICY_REASONS,
    REASONS,
    STATUS_COLUMNS,
    STATUS_FIELDS,
    TRANSIENT_REASONS,
    SampleError,
    SampleRecord,
    decode_members,
    load_npy,
    npy_bytes,
    sample_key,
    shard_name,
)
from core.shards.tar import (
    DEFAULT_MAX_MEMBER_BYTES,
    KNOWN_MEMBERS,
    RawSample,
    ShardError,
    check_plain_tar,
    iter_samples,
    split_name,
)
from core.shards.validate import BAD_REASONS, BadSample, DatasetError, SampleSpec, check_sample

__all__ = [
    "BAD_REASONS",
    "DEFAULT_MAX_MEMBER_BYTES",
    "FORMAT_VERSION",
    "KNOWN_MEMBERS",
    "PERMANENT_REASONS",
    "POLICY_REASONS",
    "REASONS",
    "STATUS_COLUMNS",
    "STATUS_FIELDS",
    "TRANSIENT_REASONS",
    "BadSample",
    "DatasetError",
    "RawSample",
    "SampleError",
    "SampleRecord",
    "SampleSpec",
    "ShardError",
    "check_plain_tar",
    "check_sample",
    "decode_members",
    "iter_samples",
    "load_npy",
    "npy_bytes",
    "sample_key",
    "shard_name",
    "split_name",
]
