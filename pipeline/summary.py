"""Counting what a run did, and the table printed at its end."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pipeline.retry import redone
from pipeline.statistics import FactorStats
from pipeline.untrusted import redact_text


@dataclass
class KindStats:
    """One kind (`videos` / `images`) in this run."""

    shard_stats: dict[int, dict[str, Any]] = field(default_factory=dict)  # shards written now
    # their per-clip factors, merged as they arrive: shard_stats keep no per-clip lists
    factor_stats: FactorStats = field(default_factory=FactorStats)
    skipped: list[int] = field(default_factory=list)  # committed before: not touched
    errors: dict[int, str] = field(default_factory=dict)  # shards whose task failed
    seconds: float = 0.0

    @property
    def rows_done(self) -> int:
        return sum(s["rows"] for s in self.shard_stats.values())

    def add_done(self, stats: dict[str, Any]) -> None:
        self.factor_stats.add(stats)
        if stats.get("factors"):  # O(shards) in the driver, not O(clips)
            stats = dict(stats, factors={k: v for k, v in stats["factors"].items()
                                         if k not in ("motion_mean", "appearance_change")})
        self.shard_stats[int(stats["shard"])] = stats

    def add_error(self, index: int, exc: BaseException) -> None:
        last = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
        self.errors[index] = f"{type(exc).__name__}: {redact_text(last)}"  # no signed URL in the log

    @staticmethod
    def totals(shards: list[dict[str, Any]]) -> dict[str, Any]:
        reasons: Counter = Counter()
        for s in shards:
            reasons.update(s.get("reasons", {}))
        return dict(
            shards=len(shards),
            rows=sum(s["rows"] for s in shards),
            ok=sum(s["ok"] for s in shards),
            failed=sum(s["failed"] for s in shards),
            reasons=dict(sorted(reasons.items())),
            tar_bytes=sum(s["tar_bytes"] for s in shards),
            sample_bytes=sum(s["sample_bytes"] for s in shards),
        )


@dataclass
class Summary:
    out: str
    workers: int = 0
    encoders: int = 0
    kinds: dict[str, KindStats] = field(default_factory=dict)
    totals: dict[str, dict[str, Any]] = field(default_factory=dict)  # over all committed shards

    def kind(self, name: str) -> KindStats:
        return self.kinds.setdefault(name, KindStats())

    @property
    def complete(self) -> bool:
        return not any(k.errors for k in self.kinds.values())

    def table(self) -> str:
        head = (
            f"{'kind':<7} {'shards':>7} {'written':>7} {'skipped':>7} {'errors':>6} {'rows':>8} {'ok':>8} "
            f"{'failed':>7} {'samples/s':>9} {'bytes/sample':>12}"
        )
        lines = [
            f"output {self.out}  ({self.workers} shard workers, {self.encoders} encoder actors)",
            head,
            "-" * len(head),
        ]
        for name, run in self.kinds.items():
            tot = self.totals.get(name) or KindStats.totals(list(run.shard_stats.values()))
            rate = run.rows_done / run.seconds if run.seconds else 0.0
            per_sample = tot["tar_bytes"] / tot["ok"] if tot["ok"] else 0
            lines.append(
                f"{name:<7} {tot['shards']:>7} {len(run.shard_stats):>7} {len(run.skipped):>7} "
                f"{len(run.errors):>6} "
                f"{tot['rows']:>8} {tot['ok']:>8} {tot['failed']:>7} {rate:>9.2f} {per_sample:>12,.0f}"
            )
            if tot["reasons"]:
                lines.append(
                    "        failed by reason: " + ", ".join(f"{r}={n}" for r, n in tot["reasons"].items())
                )
                retried = sum(n for r, n in tot["reasons"].items() if redone(r, "transient"))
                if retried:  # say which failures a rerun could still turn into samples
                    lines.append(f"        {retried} of them transient or refused by a rule: --retry-failed "
                                 "redoes those, --retry-failed=all every failure")
            for index, error in sorted(run.errors.items())[:5]:
                lines.append(f"        shard {index:06d} NOT written: {error}")
        if not self.complete:
            lines.append(
                "some shards were not written (see above); rerun the same command to redo only those"
            )
        return "\n".join(lines)
