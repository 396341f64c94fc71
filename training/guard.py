"""The non-finite guard: a NaN/inf loss or gradient norm on any rank skips the optimiser step on
every rank, is counted, and after `train.max_skipped_steps` in a row stops the job with the
shards of the last batches named.

How the skip happens: a rank whose loss is not finite backpropagates `loss * NaN`, so every one
of its gradients is NaN; ZeRO's global gradient norm is all-reduced, so it is NaN on every rank
and DeepSpeed discards the step everywhere (its overflow path: gradients zeroed, no update, no
scheduler step). A finite loss whose gradients overflow takes the same path. All ranks thus run
the same collectives, and `engine.was_step_applied()` tells each rank the outcome, which the
per-step all-reduce (training/metrics.py reduce_step) cross-checks.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch.distributed as dist


class NonFiniteLossError(RuntimeError):
    """Too many optimiser steps in a row were skipped; raised on every rank alike."""


class NonFiniteGuard:
    """Skip counters (a registry entry: they survive a resume) and the stop rule."""

    def __init__(self, max_in_row: int, rank: int, world: int, log=print):
        self.max_in_row, self.rank, self.world, self.log = max_in_row, rank, world, log
        self.total = 0  # skipped optimiser steps over the run
        self.in_row = 0
        self.recent: deque[tuple[int, list[dict[str, Any]]]] = deque(maxlen=max_in_row)

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.total, "skipped_in_row": self.in_row}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total, self.in_row = int(state["skipped_steps"]), int(state["skipped_in_row"])

    def after_step(self, step: int, reduced: dict[str, Any], loss_finite: bool, shards: list[str]) -> bool:
        """Collective when the step was skipped (every rank knows it from `reduced`); returns
        whether it was."""
        nonfinite, not_applied = reduced["nonfinite_ranks"], reduced["not_applied_ranks"]
        if not nonfinite and not not_applied:
            self.in_row = 0
            self.recent.clear()
            return False
        if not_applied != self.world:
            raise RuntimeError(
                f"step {step}: DeepSpeed applied the optimiser step on {self.world - not_applied} of "
                f"{self.world} ranks although {nonfinite} rank(s) had a non-finite loss; the replicas "
                "may now differ. Resume from the last checkpoint and report this as a bug"
            )
        mine = {"rank": self.rank, "nonfinite_loss": not loss_finite, "shards": sorted(set(shards))}
        everyone: list[Any] = [None] * self.world
        dist.all_gather_object(everyone, mine)
        culprits = [e for e in everyone if e["nonfinite_loss"]]
        what = (
            f"non-finite loss on rank(s) {[e['rank'] for e in culprits]}"
            if culprits
            else "non-finite gradient norm"
        )
        self.total += 1
        self.in_row += 1
        self.recent.append((step, culprits or everyone))
        self.log(
            f"[train] step {step}: optimiser step skipped on every rank ({what}); "
            f"{self.in_row} in a row, {self.total} in this run"
        )
        return True

    def check(self) -> None:
        """Called after the step's metrics are logged: stop once too many were skipped in a row."""
        if self.in_row >= self.max_in_row:
            raise NonFiniteLossError(
                f"{self.in_row} optimiser steps in a row skipped for a non-finite loss or gradient norm "
                f"(train.max_skipped_steps={self.max_in_row}); the last batches came from:\n"
                + "\n".join(
                    f"  step {s}: rank {e['rank']}: {', '.join(e['shards']) or 'unknown shards'}"
                    for s, entries in self.recent
                    for e in entries
                )
                + "\nCheck those shards (bad latents?) or lower optim.lr, then relaunch with --resume auto"
            )
