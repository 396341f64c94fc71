"""Checkpoints under `OUTPUT/checkpoints/step_XXXXXXX/` (docs/training.md): a registry of state.

Like torchtitan's `CheckpointManager`, `CheckpointManager.states` maps a name to an object with
`state_dict()`/`load_state_dict()`, and one save loop and one load loop handle them all; new
state is one `register(...)` line. Each entry has a scope:

- `ENGINE`: the DeepSpeed engine (model, optimiser, scheduler), saved and loaded by DeepSpeed
  itself (a collective). Its `client_state` is written by rank 0 only, so nothing per-rank
  goes there.
- `SHARED`: identical on every rank (EMA weights, run counters): rank 0 writes `NAME.safetensors`
  when the state is all tensors, else an entry of `shared.json`.
- `RANK`: per-rank (data-stream position, RNG states): an entry of `rank_NNNNN.json`, plain JSON,
  no pickles. Restored only when the rank's topology (world size, role, loader workers) is
  unchanged; otherwise the entry's `rederive(step)` gives fresh deterministic state, and the log
  says so.

Every file is fsynced and its size goes into `complete.json`, written by rank 0 last, after all
ranks reported success (an all-gather, not a barrier: a rank whose write failed, e.g. disk full,
still takes part, so no rank hangs; then every rank raises `CheckpointSaveError` and the previous
checkpoint stays the newest complete one). Only then is `OUTPUT/checkpoints/latest` updated.
`--resume auto` picks the newest directory that passes `check_complete` (sizes included).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from core.checkpoints import (  # noqa: F401  (re-exported: training's public names)
    COMPLETE,
    ResumeError,
    UntrustedCheckpointError,
    check_complete,
    check_trusted,
    checkpoint_meta,
    checkpoints_root,
    find_latest_complete,
    fsync_path,
    list_checkpoints,
    rank_file,
    resolve_resume,
    tag_for,
    write_atomic,
    write_durable,
)

UNIVERSAL = "universal"  # sub-folder holding the Universal Checkpoint conversion
SHARED_JSON = "shared.json"
ENGINE, SHARED, RANK = "engine", "shared", "rank"


class CheckpointSaveError(RuntimeError):
    """A save failed on some rank; raised on every rank alike."""


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# --- RNG state as JSON -------------------------------------------------------------------


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(mt), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
        "generator": generator.get_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


class RNGState:
    """Python, NumPy, torch (CPU, CUDA) and the diffusion noise generator of this rank."""

    def __init__(self, generator: torch.Generator, seed_for_step: Callable[[int], int]):
        self.generator, self.seed_for_step = generator, seed_for_step

    def state_dict(self) -> dict[str, Any]:
        return rng_state(self.generator)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_rng_state(state, self.generator)

    def rederive(self, step: int) -> None:
        seed = self.seed_for_step(step)
        self.generator.manual_seed(seed)
        torch.manual_seed(seed)


class EngineState:
    """The DeepSpeed engine as a registry entry; `after_load` re-applies the config's optimiser
    settings (the config, not the checkpoint, sets the hyper-parameters)."""

    def __init__(self, engine, after_load: Callable[[], None] | None = None):
        self.engine, self.after_load = engine, after_load

    def save(self, root: Path, tag: str, step: int) -> tuple[list[Path], str | None]:
        from deepspeed.checkpoint.constants import (
            UNIVERSAL_CHECKPOINT_INFO,
            UNIVERSAL_CHECKPOINT_VERSION_KEY,
            UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        )

        client_state = {
            "step": step,
            UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE},
        }
        recorder = _RecordingEngine(self.engine.checkpoint_engine)
        self.engine.checkpoint_engine = recorder
        try:
            self.engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
        except Exception as err:  # noqa: BLE001 - reported to every rank by the save loop
            recorder.error = recorder.error or repr(err)
        finally:
            self.engine.checkpoint_engine = recorder.inner
        return recorder.files, recorder.error

    def load(self, load_dir: str, tag: str) -> None:
        load_path, _ = self.engine.load_checkpoint(load_dir, tag=tag)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint {load_dir}/{tag}")
        if self.after_load is not None:
            self.after_load()


class _RecordingEngine:
    """Wraps DeepSpeed's checkpoint engine: every file it writes is fsynced and recorded, and a
    failed write is recorded instead of raised, so this rank still reaches DeepSpeed's own
    barriers and the save loop's agreement instead of leaving the others waiting."""

    def __init__(self, inner):
        self.inner, self.files, self.error = inner, [], None

    def save(self, state_dict, path: str) -> None:
        if self.error is not None:
            return
        try:
            self.inner.save(state_dict, path)
            fsync_path(path)
            self.files.append(Path(path))
        except Exception as err:  # noqa: BLE001 - e.g. OSError(ENOSPC)
            self.error = f"{path}: {err!r}"

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


@dataclass
class Entry:
    obj: Any
    scope: str
    rederive: Callable[[int], None] | None = None  # RANK: fresh state when the topology changed


# --- the registry: one save loop, one load loop ---------------------------------------------


class CheckpointManager:
    def __init__(self, output: str | Path, keep: int, topology: dict[str, Any], log=print):
        self.output, self.keep, self.topology, self.log = Path(output), keep, topology, log
        self.states: dict[str, Entry] = {}

    def register(
        self, name: str, obj: Any, scope: str, rederive: Callable[[int], None] | None = None
    ) -> None:
        """`obj` None (e.g. EMA switched off) registers nothing."""
        if scope not in (ENGINE, SHARED, RANK):
            raise ValueError(f"scope must be {ENGINE}, {SHARED} or {RANK}, got {scope!r}")
        if obj is not None:
            self.states[name] = Entry(obj, scope, rederive if rederive else getattr(obj, "rederive", None))

    def save(self, step: int, meta: dict[str, Any], config_yaml: str | None = None) -> Path:
        """Collective: every rank calls it at the same step. `config_yaml` (the resolved, redacted
        training config) stays with the weights so an export never pairs them with a later one."""
        import torch.distributed as dist

        rank, world = dist.get_rank(), dist.get_world_size()
        root = checkpoints_root(self.output)
        ckpt = root / tag_for(step)
        previous = find_latest_complete(self.output, log=lambda _m: None) if rank == 0 else None
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            if ckpt.exists():  # leftovers of an earlier attempt at this step (crash, older branch)
                shutil.rmtree(ckpt)
        dist.barrier()
        files, error = [], None
        for entry in self.states.values():  # DeepSpeed first: it creates the directory
            if entry.scope == ENGINE:
                written, error = entry.obj.save(root, ckpt.name, step)
                files += written
        if error is None:
            try:
                files += self._write_own_files(ckpt, rank, config_yaml)
            except Exception as err:  # noqa: BLE001 - agreed on below by every rank
                error = repr(err)
        sizes = {str(p.relative_to(ckpt)): p.stat().st_size for p in files if error is None}
        reports: list[Any] = [None] * world
        dist.all_gather_object(reports, {"error": error, "files": sizes})
        failed = {r: rep["error"] for r, rep in enumerate(reports) if rep["error"]}
        if not failed and rank == 0:
            try:
                all_sizes = {k: v for rep in reports for k, v in rep["files"].items()}
                ema = "ema.safetensors" in all_sizes
                complete = {**meta, "step": step, "world_size": world, "ema": ema, "files": all_sizes}
                write_atomic(ckpt / COMPLETE, json.dumps(complete, indent=1))
                write_atomic(root / "latest", ckpt.name)
            except Exception as err:  # noqa: BLE001
                failed[0] = repr(err)
        verdict = [failed, str(previous or "none")]
        dist.broadcast_object_list(verdict, src=0)
        failed, previous = verdict
        if failed:
            if rank == 0:
                shutil.rmtree(ckpt, ignore_errors=True)
            raise CheckpointSaveError(
                f"saving checkpoint {ckpt} failed on rank(s) {sorted(failed)}: "
                + "; ".join(f"rank {r}: {e}" for r, e in sorted(failed.items()))
                + f". Every rank stops; the newest complete checkpoint is still {previous}. "
                "Free disk space (or fix the storage) and relaunch with --resume auto"
            )
        if rank == 0:
            prune(self.output, self.keep, self.log)
            self.log(f"[checkpoint] saved {ckpt}")
        dist.barrier()
        return ckpt

    def _write_own_files(self, ckpt: Path, rank: int, config_yaml: str | None) -> list[Path]:
        own = {name: e.obj.state_dict() for name, e in self.states.items() if e.scope == RANK}
        written = [rank_file(ckpt, rank)]
        write_durable(written[0], json.dumps({"topology": self.topology, **own}))
        if rank != 0:
            return written
        shared = {}
        for name, entry in self.states.items():
            if entry.scope != SHARED:
                continue
            state = entry.obj.state_dict()
            if state and all(torch.is_tensor(v) for v in state.values()):
                from safetensors.torch import save_file

                path = ckpt / f"{name}.safetensors"
                save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path))
                fsync_path(path)
                written.append(path)
            else:
                shared[name] = state
        written.append(ckpt / SHARED_JSON)
        write_durable(written[-1], json.dumps(shared))
        if config_yaml is not None:
            written.append(ckpt / "config.yaml")
            write_durable(written[-1], config_yaml)
        return written

    def load(self, path: Path, load_dir: str, tag: str, same_world: bool) -> str:
        """Restore every entry; returns how per-rank state was restored (for the log)."""
        import torch.distributed as dist

        step = int(checkpoint_meta(path)["step"])
        shared_file = path / SHARED_JSON
        shared = json.loads(shared_file.read_text()) if shared_file.is_file() else {}
        rank_path = rank_file(path, dist.get_rank())
        own = json.loads(rank_path.read_text()) if same_world and rank_path.is_file() else None
        why = self._rederive_reason(own, same_world)
        for name, entry in self.states.items():
            if entry.scope == ENGINE:
                entry.obj.load(load_dir, tag)
            elif entry.scope == SHARED:
                self._load_shared(name, entry, path, shared)
            elif why is None:
                entry.obj.load_state_dict(own[name])
            elif entry.rederive is not None:
                entry.rederive(step)
        if why is None:
            return "per-rank state restored"
        return f"data streams and RNGs re-derived from (seed, rank, step {step}): {why}"

    def _rederive_reason(self, own: dict[str, Any] | None, same_world: bool) -> str | None:
        if not same_world:
            return "the world size changed"
        if own is None:
            return "no per-rank file for this rank"
        if "topology" not in own:
            return "the checkpoint predates the checkpoint registry (no topology in its rank files)"
        saved = own["topology"]
        changed = [f"{k} {saved.get(k)} -> {v}" for k, v in self.topology.items() if saved.get(k) != v]
        if changed:
            return ", ".join(changed)
        missing = [n for n, e in self.states.items() if e.scope == RANK and n not in own]
        return f"checkpoint lacks {', '.join(missing)}" if missing else None

    def _load_shared(self, name: str, entry: Entry, path: Path, shared: dict[str, Any]) -> None:
        tensors = path / f"{name}.safetensors"
        if tensors.is_file():
            from safetensors.torch import load_file

            entry.obj.load_state_dict(load_file(str(tensors)))
        elif name in shared:
            entry.obj.load_state_dict(shared[name])
        else:
            self.log(f"[checkpoint] {path.name} has no {name} state: it starts fresh")


def prune(output: str | Path, keep: int, log=print) -> None:
    """Keep the newest `keep` complete checkpoints; drop older ones and older incomplete ones."""
    kept = 0
    for _, path in reversed(list_checkpoints(output)):
        if check_complete(path) is None:
            kept += 1
            if kept > keep:
                shutil.rmtree(path, ignore_errors=True)
                log(f"[checkpoint] removed old {path}")
        elif kept:
            shutil.rmtree(path, ignore_errors=True)
            log(f"[checkpoint] removed incomplete {path}")


# --- Universal Checkpointing (resume on another world size) --------------------------------


def prepare_universal(ckpt: Path, log=print) -> Path:
    """Rank 0 converts `ckpt` with DeepSpeed's `ds_to_universal` once; returns its folder."""
    out = ckpt / UNIVERSAL
    if (out / COMPLETE).is_file():
        return out
    tmp = ckpt / (UNIVERSAL + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    log(f"[checkpoint] converting {ckpt} to a Universal Checkpoint (world size changed)")
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.checkpoint.ds_to_universal",
        "--input_folder",
        str(ckpt),
        "--output_folder",
        str(tmp),
        "--num_extract_workers",
        "1",
        "--num_merge_workers",
        "1",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ds_to_universal failed on {ckpt}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    (tmp / COMPLETE).write_text(json.dumps({"source": str(ckpt)}))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out
