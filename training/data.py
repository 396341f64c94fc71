"""Streaming, resumable, sample-shuffled readers of shard format v1 (docs/shard-format.md) for image ranks
and video ranks.

Every (role, role_rank, loader worker) owns one *stream*: an endless sequence of shard draws.
Draws go through the shards epoch by epoch, each epoch a permutation seeded by
`(seed, role, generation, stream, epoch)`: every sample is seen once per epoch whatever its
shard's size (uniform over samples), and no rank ever runs dry (no end-of-epoch hangs).

A stream keeps `data.shuffle_shards` (K) shards open in *slots* and takes each sample from a
slot picked by a seeded RNG, never the slot of the previous sample, so consecutive samples
come from different shards. An optional shuffle buffer (`data.shuffle_buffer`) mixes further.
Every choice is a function of counters, so a stream's position is a small JSON object (draw
counter, pick counter, per-slot draw and offset, buffer entries as (draw, sample index)) and
`load_state_dict()` rebuilds the exact state, buffer contents included, by re-reading them.

Every sample is checked against `dataset.json` (`core.shards.check_sample`) before it joins
a batch; a bad one is skipped and counted by reason, so nothing a shard holds can stop the
stream. Workers hand out batches round-robin; each batch carries its stream's position after
it, so the main process knows exactly what was consumed.
"""

from __future__ import annotations

import copy
import logging
import random
from collections import Counter
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from core.shards import BAD_REASONS, BadSample, check_sample
from training.config import DataConfig
from training.roles import IMAGE, RankRole
from training.sources import DataError, ReadOptions, ShardReader, ShardSource, list_shards

log = logging.getLogger(__name__)

# A stream that closes this many shards in a row without one good sample gives up (all bad).
MAX_BAD_DRAWS = 64
BAD_KEYS = (*BAD_REASONS, "bad_shard")  # the keys of `bad_by_reason`
STATE_VERSION = 2  # positions of another layout (or another K / buffer size) are re-derived


def fresh_position(generation: int, slots: int) -> dict[str, Any]:
    return {
        "version": STATE_VERSION,
        "generation": generation,  # bumped when streams are re-derived (e.g. new world size)
        "draws": slots,  # next draw index; draws 0..K-1 fill the slots
        "picks": 0,
        "last": -1,  # slot of the previous sample
        "barren": 0,  # shards closed in a row without a good sample
        "emitted": 0,  # shuffle-buffer replacements so far
        "slots": [[k, 0, False] for k in range(slots)],  # [draw, samples read, any good]
        "buffer": [],  # [draw, sample index] of the buffered samples, in buffer order
    }


def to_example(sample: dict[str, Any], role: str) -> dict[str, Any]:
    """One checked sample -> tensors the model takes."""
    lat = torch.from_numpy(sample["latents"].astype(np.float32))
    out: dict[str, Any] = {"caption": sample["caption"]}
    if role == IMAGE:
        out["latents"] = lat.unsqueeze(1)  # [4,1,h,w]: the spatial-only pass has F=1
    else:
        out["latents"] = lat.permute(1, 0, 2, 3).contiguous()  # [4,F,h,w]
        out["motion"] = torch.from_numpy(sample["motion"])
        out["appearance"] = torch.from_numpy(sample["appearance"])
    text = sample["text"]
    out["text"] = None if text is None else torch.from_numpy(text.astype(np.float32))
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


class _Stream:
    """One stream's state machine (runs inside a loader worker)."""

    def __init__(self, owner: _Streams, stream: int, pos: dict[str, Any]):
        self.o, self.stream, self.pos = owner, stream, copy.deepcopy(pos)
        self.readers: dict[int, ShardReader] = {}
        self.bad: Counter = Counter()
        self.events: Counter = Counter()
        self._perm: tuple[int, list[int]] = (-1, [])

    def _rng(self, what: str, n: int) -> random.Random:
        o = self.o
        return random.Random(f"{o.seed}/{o.role.role}/{self.pos['generation']}/{self.stream}/{what}/{n}")

    def url_for(self, draw: int) -> str:
        epoch, i = divmod(draw, len(self.o.drawable))
        if self._perm[0] != epoch:
            order = list(self.o.drawable)
            self._rng("epoch", epoch).shuffle(order)
            self._perm = (epoch, order)
        return self.o.source.urls[self._perm[1][i]]

    def _refill(self, k: int) -> None:
        pos, slot = self.pos, self.pos["slots"][k]
        reader = self.readers.pop(k, None)
        if reader is not None:
            reader.close()
        pos["barren"] = 0 if slot[2] else pos["barren"] + 1
        if pos["barren"] >= MAX_BAD_DRAWS:
            raise DataError(
                f"{MAX_BAD_DRAWS} shards in a row gave no valid sample (last: {self.url_for(slot[0])}); "
                f"skipped so far by reason: {dict(self.bad)}"
            )
        pos["slots"][k] = [pos["draws"], 0, False]
        pos["draws"] += 1

    def _raw_from(self, k: int):
        """Next raw sample of slot k, refilling the slot from the next draw at a shard's end."""
        while True:
            slot = self.pos["slots"][k]
            url = self.url_for(slot[0])
            reader = self.readers.get(k)
            if reader is None:
                reader = self.readers[k] = ShardReader(url, slot[1], self.o.read, self.events)
            try:
                raw = reader.next()
            except Exception as err:  # noqa: BLE001 - unreadable or corrupt shard: skip, count
                log.warning("skipping unreadable shard %s: %s", url, err)
                self.bad["bad_shard"] += 1
                self._refill(k)
                continue
            if raw is None:
                self._refill(k)
                continue
            slot[1] = reader.offset
            return raw, slot

    def _check(self, raw) -> dict[str, Any] | None:
        try:
            return to_example(check_sample(raw, self.o.source.spec), self.o.role.role)
        except BadSample as err:
            self.bad[err.reason] += 1
            log.info("skipping sample: %s", err)
        except Exception as err:  # noqa: BLE001 - nothing a sample holds may stop the stream
            self.bad["internal_error"] += 1
            log.info("skipping sample %s: %r", raw.key, err)
        return None

    def pick(self) -> int:
        pos, n = self.pos, self.pos["picks"]
        choices = [k for k in range(len(pos["slots"])) if k != pos["last"]] or [0]
        k = choices[self._rng("pick", n).randrange(len(choices))]
        pos["picks"], pos["last"] = n + 1, k
        return k

    def rebuild_buffer(self) -> list[tuple[dict[str, Any], str]]:
        """Re-read the buffered samples named in the position (their shards are deterministic)."""
        out = []
        for draw, index in self.pos["buffer"]:
            url = self.url_for(draw)
            reader = ShardReader(url, index, self.o.read)
            raw = reader.next()
            reader.close()
            example = None if raw is None else self._check(raw)
            if example is None:
                raise DataError(f"cannot rebuild the shuffle buffer: {url} sample {index} is gone or changed")
            out.append((example, url))
        self.bad.clear()
        return out

    def samples(self):
        """Endless (example, shard url) in stream order."""
        buffer = self.rebuild_buffer()
        size = self.o.buffer_size
        while True:
            k = self.pick()
            raw, slot = self._raw_from(k)
            example = self._check(raw)
            if example is None:
                continue
            slot[2] = True
            item, ident = (example, self.url_for(slot[0])), [slot[0], raw.index]
            if size == 0:
                yield item
                continue
            if len(buffer) < size:
                buffer.append(item)
                self.pos["buffer"].append(ident)
                continue
            i = self._rng("buffer", self.pos["emitted"]).randrange(size)
            self.pos["emitted"] += 1
            out, buffer[i], self.pos["buffer"][i] = buffer[i], item, ident
            yield out


class _Streams(IterableDataset):
    """Runs inside each loader worker: one stream per worker, batches of `micro_batch`."""

    def __init__(self, loader: RoleLoader, positions: dict[int, dict[str, Any]], rotation: int):
        self.source, self.role, self.seed = loader.source, loader.role, loader.cfg.seed
        self.num_workers, self.positions, self.rotation = max(1, loader.num_workers), positions, rotation
        self.buffer_size, self.read = loader.cfg.shuffle_buffer, loader.read
        self.drawable = [i for i, n in enumerate(self.source.sizes) if n > 0]
        if not self.drawable:
            raise DataError(
                f"every {self.role.role} shard has an ok count of 0 (first: {self.source.urls[0]})"
            )

    def __iter__(self):
        info = get_worker_info()
        worker = ((info.id if info else 0) + self.rotation) % self.num_workers
        stream = _Stream(self, self.role.role_rank * self.num_workers + worker, self.positions[worker])
        examples, shards = [], []
        for example, url in stream.samples():
            examples.append(example)
            shards.append(url)
            if len(examples) < self.role.micro_batch:
                continue
            # Collate outside any handler: every example was checked to the exact same shapes.
            batch = collate(examples)
            examples, batch["shards"] = [], shards
            shards = []
            events, bad = dict(stream.events), dict(stream.bad)
            stream.events.clear(), stream.bad.clear()
            pos = {
                **stream.pos,
                "slots": [list(s) for s in stream.pos["slots"]],
                "buffer": [list(b) for b in stream.pos["buffer"]],
            }
            yield {**batch, "worker": worker, "pos": pos, "bad": bad, "events": events}


class RoleLoader:
    """The batches of one rank (image or video role), resumable to the exact sample."""

    def __init__(self, source: ShardSource, role: RankRole, cfg: DataConfig | None = None):
        self.source, self.role, self.cfg = source, role, cfg or DataConfig()
        if source.spec.kind != role.role:
            raise ValueError(f"a {role.role} rank cannot read {source.spec.kind} shards")
        self.num_workers = self.cfg.num_workers
        self.read = ReadOptions(
            dict(self.cfg.storage_options),
            self.cfg.max_member_bytes,
            self.cfg.read_retries,
            self.cfg.retry_backoff_s,
        )
        self.positions = self._fresh(0)
        self.batches = 0  # batches handed to the trainer so far
        self.bad: Counter = Counter()  # skipped samples / shards by reason (consumed batches only)
        self.events: Counter = Counter()  # read retries, unknown members skipped unread
        self._iter = None
        self._reported = 0

    def _fresh(self, generation: int) -> dict[int, dict[str, Any]]:
        return {
            w: fresh_position(generation, self.cfg.shuffle_shards) for w in range(max(1, self.num_workers))
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "role": self.role.role,
            "role_rank": self.role.role_rank,
            "role_size": self.role.role_size,
            "num_workers": self.num_workers,
            "seed": self.cfg.seed,
            "shuffle": [self.cfg.shuffle_shards, self.cfg.shuffle_buffer],
            "batches": self.batches,
            "positions": {str(w): p for w, p in self.positions.items()},
            "bad": dict(self.bad),
            "events": dict(self.events),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.bad, self.events = Counter(state.get("bad", {})), Counter(state.get("events", {}))
        positions = {int(w): p for w, p in state["positions"].items()}
        same = state.get("shuffle") == [self.cfg.shuffle_shards, self.cfg.shuffle_buffer] and all(
            p.get("version") == STATE_VERSION for p in positions.values()
        )
        if same and len(positions) == len(self.positions):
            self.batches, self.positions = int(state["batches"]), positions
        else:
            generation = 1 + max(int(p.get("generation", 0)) for p in positions.values())
            self.reseed(generation, "the saved loader state has another layout (shuffle settings or workers)")
        self._iter = None

    def reseed(self, generation: int, why: str = "new world size or rank roles") -> None:
        """Fresh deterministic streams (a new world size cannot continue the old positions)."""
        print(
            f"[data] {self.role.role} rank {self.role.role_rank}: streams re-derived from seed "
            f"{self.cfg.seed}, generation {generation} ({why})",
            flush=True,
        )
        self.positions = self._fresh(generation)
        self.batches = 0
        self._iter = None

    def _make_iter(self):
        dataset = _Streams(self, self.positions, self.batches % max(1, self.num_workers))
        kwargs = (
            {"prefetch_factor": self.cfg.prefetch_factor, "persistent_workers": False}
            if self.num_workers
            else {}
        )
        return iter(DataLoader(dataset, batch_size=None, num_workers=self.num_workers, **kwargs))

    def __next__(self) -> dict[str, Any]:
        if self._iter is None:
            self._iter = self._make_iter()
        batch = next(self._iter)
        self.positions[batch.pop("worker")] = batch.pop("pos")
        bad = batch.pop("bad")
        self.bad.update(bad)
        self.events.update(batch.pop("events"))
        self.batches += 1
        if bad and (self._reported < 20 or self.batches % 100 == 0):
            self._reported += 1
            print(
                f"[data] {self.role.role} rank {self.role.role_rank}: skipped {bad} in batch {self.batches} "
                f"(total by reason {dict(self.bad)})",
                flush=True,
            )
        return batch

    def __iter__(self):
        return self

    def close(self) -> None:
        self._iter = None


def reduce_bad(bad: Counter, device: torch.device) -> dict[str, int]:
    """Skipped samples/shards by reason, summed over ranks (one small all_reduce)."""
    t = torch.tensor([float(bad.get(k, 0)) for k in BAD_KEYS], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return {k: int(v) for k, v in zip(BAD_KEYS, t.tolist()) if v}


__all__ = ["DataError", "RoleLoader", "ShardSource", "list_shards", "reduce_bad"]
