"""Streaming, resumable readers of shard format v1 (SPEC §1) for image ranks and video ranks.

Every (role, role_rank, loader worker) owns one *stream*: an endless sequence of shard draws,
draw d picking shard `Random(f"{seed}/{role}/{generation}/{stream}/{d}")`, i.e. shards are
resampled with replacement from deterministic seeds, so uneven shard counts never leave a rank
without data (no end-of-epoch hangs) and a stream's position is just (draw, offset into the
shard). webdataset parses the tars; fsspec opens them (local paths, s3://, gs://, ...).

Workers hand out batches round-robin; each batch carries its stream's position after it, so the
main process knows exactly what was consumed: `state_dict()` is that, and `load_state_dict()`
restarts every stream at its position and rotates workers so the round-robin continues.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from core.shard_format import FORMAT_VERSION, decode_members
from training.roles import IMAGE, RankRole

log = logging.getLogger(__name__)

# A stream that draws this many shards in a row without one good sample gives up (all shards bad).
MAX_BAD_DRAWS = 64


class DataError(ValueError):
    """The data root cannot feed this job; the message names the path and what to do."""


def list_shards(root: str, role: str, storage: dict[str, Any] | None = None) -> list[str]:
    """Complete shards of `ROOT/{role}s/`: a tar counts only once its `.json` marker exists."""
    fs, base = fsspec.core.url_to_fs(root, **(storage or {}))
    folder = f"{base.rstrip('/')}/{role}s"
    if not fs.isdir(folder):
        raise DataError(
            f"data root {root} has no {role}s/ folder, but this job has {role} ranks; point --data at a "
            f"preprocessing output root (SPEC §1) or change roles.image_ratio / roles.image_ranks"
        )
    names = set(fs.ls(folder, detail=False))
    tars = sorted(p for p in names if p.endswith(".tar") and p[: -len(".tar")] + ".json" in names)
    if not tars:
        raise DataError(
            f"{root}/{role}s/ holds no complete shard (NNNNNN.tar with its NNNNNN.json); rerun prep"
        )
    return [fs.unstrip_protocol(p) for p in tars]


def read_shard(url: str, storage: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """Raw webdataset samples (bytes per member) of one shard, opened through fsspec."""
    with fsspec.open(url, "rb", **(storage or {})) as stream:
        files = wds.tariterators.tar_file_expander([{"url": url, "stream": stream}])
        yield from wds.tariterators.group_by_keys(files)


def check_format(url: str, storage: dict[str, Any] | None = None) -> None:
    """Fail before the first step on shards of another format version."""
    for raw in read_shard(url, storage):
        try:
            decode_members(raw)
        except ValueError as err:
            raise DataError(f"{url}: {err}") from None
        return
    raise DataError(f"{url}: shard holds no sample; rerun prep for it")


@dataclass
class StreamPos:
    generation: int = 0  # bumped when streams are re-derived (e.g. new world size)
    draw: int = 0
    offset: int = 0  # samples of the current draw already consumed


def to_example(sample: dict[str, Any], role: str, frames: int) -> dict[str, Any]:
    """One decoded sample -> tensors the model takes; raises ValueError with a reason."""
    latents = sample.get("latents")
    if latents is None:
        raise ValueError("missing_latents")
    lat = torch.from_numpy(np.asarray(latents, dtype=np.float32))
    out: dict[str, Any] = {"caption": sample.get("txt", "")}
    if role == IMAGE:
        if lat.ndim != 3 or lat.shape[0] != 4:
            raise ValueError("bad_shape")
        out["latents"] = lat.unsqueeze(1)  # [4,1,h,w]: the spatial-only pass has F=1
    else:
        motion, appearance = sample.get("motion"), sample.get("appearance")
        if lat.ndim != 4 or lat.shape[0] != frames or lat.shape[1] != 4:
            raise ValueError("bad_shape")
        if motion is None or appearance is None:
            raise ValueError("missing_guidance")
        out["latents"] = lat.permute(1, 0, 2, 3).contiguous()  # [4,F,h,w]
        out["motion"] = torch.from_numpy(np.asarray(motion, dtype=np.float32)).reshape(frames - 1)
        out["appearance"] = torch.from_numpy(np.asarray(appearance, dtype=np.float32)).reshape(frames, frames)
    text = sample.get("text")
    out["text"] = None if text is None else torch.from_numpy(np.asarray(text, dtype=np.float32))
    return out


def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
    batch: dict[str, Any] = {"caption": [e["caption"] for e in examples]}
    for name in ("latents", "motion", "appearance"):
        if name in examples[0]:
            batch[name] = torch.stack([e[name] for e in examples])
    texts = [e["text"] for e in examples]
    batch["has_text"] = torch.tensor([t is not None for t in texts])
    if any(t is not None for t in texts):
        shape = next(t for t in texts if t is not None).shape
        batch["text"] = torch.stack([t if t is not None else torch.zeros(shape) for t in texts])
    return batch


class _Streams(IterableDataset):
    """Runs inside each loader worker: one stream per worker, batches of `micro_batch`."""

    def __init__(
        self,
        urls: list[str],
        role: RankRole,
        frames: int,
        seed: int,
        num_workers: int,
        positions: dict[int, StreamPos],
        rotation: int,
        storage: dict[str, Any],
    ):
        self.urls, self.role, self.frames, self.seed, self.storage = urls, role, frames, seed, storage
        self.num_workers, self.positions, self.rotation = max(1, num_workers), positions, rotation

    def shard_for(self, stream: int, pos: StreamPos) -> str:
        rng = random.Random(f"{self.seed}/{self.role.role}/{pos.generation}/{stream}/{pos.draw}")
        return self.urls[rng.randrange(len(self.urls))]

    def __iter__(self):
        info = get_worker_info()
        worker = ((info.id if info else 0) + self.rotation) % self.num_workers
        stream = self.role.role_rank * self.num_workers + worker
        pos = StreamPos(**vars(self.positions[worker]))
        examples, sources, bad, bad_draws = [], [], Counter(), 0
        while True:
            url, good = self.shard_for(stream, pos), False
            try:
                for i, raw in enumerate(read_shard(url, self.storage)):
                    if i < pos.offset:
                        continue
                    pos.offset = i + 1
                    try:
                        examples.append(to_example(decode_members(raw), self.role.role, self.frames))
                        sources.append(url)  # named when the loss of this batch is not finite
                        good = True
                    except ValueError as err:
                        reason = str(err) if str(err).isidentifier() else "decode_error"
                        bad[reason] += 1
                        continue
                    if len(examples) == self.role.micro_batch:
                        yield {
                            **collate(examples),
                            "worker": worker,
                            "pos": vars(pos).copy(),
                            "bad": dict(bad),
                            "shards": sources,
                        }
                        examples, sources, bad = [], [], Counter()
            except Exception as err:  # unreadable or corrupt shard: skip it, count it, go on
                log.warning("skipping unreadable shard %s: %s", url, err)
                bad["bad_shard"] += 1
            bad_draws = 0 if good else bad_draws + 1
            if bad_draws >= MAX_BAD_DRAWS:
                raise DataError(f"{MAX_BAD_DRAWS} shard draws in a row gave no readable sample (last: {url})")
            pos.draw, pos.offset = pos.draw + 1, 0


class RoleLoader:
    """The batches of one rank (image or video role), resumable to the exact sample."""

    def __init__(
        self,
        urls: list[str],
        role: RankRole,
        frames: int,
        seed: int,
        num_workers: int,
        prefetch_factor: int = 2,
        storage: dict[str, Any] | None = None,
    ):
        self.urls, self.role, self.frames, self.seed, self.storage = urls, role, frames, seed, storage or {}
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.positions = {w: StreamPos() for w in range(max(1, num_workers))}
        self.batches = 0  # batches handed to the trainer so far
        self.bad: Counter = Counter()  # skipped samples/shards by reason (consumed batches only)
        self._iter = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "role": self.role.role,
            "role_rank": self.role.role_rank,
            "role_size": self.role.role_size,
            "num_workers": self.num_workers,
            "seed": self.seed,
            "batches": self.batches,
            "positions": {str(w): vars(p).copy() for w, p in self.positions.items()},
            "bad": dict(self.bad),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches = int(state["batches"])
        self.positions = {int(w): StreamPos(**p) for w, p in state["positions"].items()}
        self.bad = Counter(state.get("bad", {}))
        self._iter = None

    def reseed(self, generation: int) -> None:
        """Fresh deterministic streams (a new world size cannot continue the old positions)."""
        self.positions = {w: StreamPos(generation=generation) for w in self.positions}
        self.batches = 0
        self._iter = None

    def _make_iter(self):
        rotation = self.batches % max(1, self.num_workers)
        dataset = _Streams(
            self.urls,
            self.role,
            self.frames,
            self.seed,
            self.num_workers,
            self.positions,
            rotation,
            self.storage,
        )
        kwargs = (
            {"prefetch_factor": self.prefetch_factor, "persistent_workers": False} if self.num_workers else {}
        )
        return iter(DataLoader(dataset, batch_size=None, num_workers=self.num_workers, **kwargs))

    def __next__(self) -> dict[str, Any]:
        if self._iter is None:
            self._iter = self._make_iter()
        batch = next(self._iter)
        self.positions[batch.pop("worker")] = StreamPos(**batch.pop("pos"))
        self.bad.update(batch.pop("bad"))
        self.batches += 1
        return batch

    def __iter__(self):
        return self

    def close(self) -> None:
        self._iter = None


__all__ = ["DataError", "FORMAT_VERSION", "RoleLoader", "check_format", "list_shards", "read_shard"]
