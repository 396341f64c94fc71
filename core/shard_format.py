"""Kept so that `from core.shard_format import ...` keeps working: the shard format's one owner
is the `core.shards` package (writing, safe tar reading, validation)."""

from core.shards import *  # noqa: F403
from core.shards import __all__  # noqa: F401
