"""Retries that tell infrastructure from data (`--retry-failed[=all]`).

Two levels:
- **Task level.** A shard task that cannot finish for a reason outside its rows (an encoder
  actor died, the output store failed) raises `TransientTaskError`; Dispatch's Ray task
  retries it (`max_retries`, `retry_exceptions`) and nothing of it is committed, so such an
  event never shows up as row failures.
- **Row level.** A committed row failure has a reason code (`core.shards.REASONS`). Plain
  `--retry-failed` (mode `transient`) redoes the rows whose reason is transient
  (`TRANSIENT_REASONS`: timeouts, 5xx and connection errors after `http.retries`, encode and
  internal errors) or a refusal by a rule of the job (`POLICY_REASONS`, which may have been
  widened since); `--retry-failed=all` redoes every failure. A permanent failure (404, decode
  error, too short...) kept by `transient` is copied into the rewritten status table as it was.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from core.shards import POLICY_REASONS, REASONS, TRANSIENT_REASONS

RETRY_MODES = ("transient", "all")


class TransientTaskError(RuntimeError):
    """The shard task failed outside its rows (actor death, storage): Ray retries the task."""


def retry_mode(value: Any) -> str | None:
    """None (no retry), "transient" or "all" from a CLI / JobArgs value (True = "transient")."""
    if value is None or value is False or value == "":
        return None
    if value is True:
        return "transient"
    if value not in RETRY_MODES:
        raise ValueError(f"--retry-failed={value!r}: expected one of {', '.join(RETRY_MODES)} (or no value)")
    return str(value)


def redone(reason: str | None, mode: str | None) -> bool:
    """Whether a committed failure with `reason` is redone under `mode`."""
    if mode is None or reason is None:
        return False
    if mode == "all":
        return True
    # An unknown code (a newer writer's) is redone: safer to try again than to keep a row forever.
    return reason in TRANSIENT_REASONS or reason in POLICY_REASONS or reason not in REASONS


def shards_to_retry(stats: Iterable[dict[str, Any]], mode: str | None) -> set[int]:
    """Committed shards (their stats jsons) with at least one failure `mode` redoes."""
    if mode is None:
        return set()
    return {int(s["shard"]) for s in stats if s.get("failed")
            and any(redone(r, mode) for r, n in (s.get("reasons") or {"?": 1}).items() if n)}


def kept_failure(row: dict[str, Any]) -> tuple:
    """A committed failure kept as it is: ("failed", reason, detail, meta) for `RowFlow._write`."""
    meta: dict[str, Any] = {}
    if row.get("width") is not None and row.get("height") is not None:
        meta["original_size"] = [row["width"], row["height"]]
    if row.get("duration") is not None:
        meta["duration"] = row["duration"]
    return ("failed", row["reason"], row.get("detail") or "", meta)
