"""Checkpoints under `OUTPUT/checkpoints/step_XXXXXXX/` (SPEC §5).

A checkpoint directory holds DeepSpeed's own save (model, optimiser, scheduler: its
`client_state` is written by rank 0 only), one `rank_NNNNN.json` per rank (data-stream position
and RNG states: plain JSON, no pickles), `ema.safetensors` when EMA is on, and last
`complete.json`, written by rank 0 after every rank's files are on disk (a barrier). Only then is
`OUTPUT/checkpoints/latest` updated. `--resume auto` scans for the newest directory that passes
`check_complete`, so a save cut short by a crash or SIGKILL is never chosen.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.checkpoints import (  # noqa: F401  (re-exported: training's public names)
    COMPLETE,
    ResumeError,
    check_complete,
    checkpoint_meta,
    checkpoints_root,
    find_latest_complete,
    list_checkpoints,
    rank_file,
    resolve_resume,
    tag_for,
    write_atomic,
)

UNIVERSAL = "universal"  # sub-folder holding the Universal Checkpoint conversion

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


# --- save / prune --------------------------------------------------------------------------


def save(
    engine,
    output: str | Path,
    step: int,
    rank_state: dict[str, Any],
    meta: dict[str, Any],
    keep: int,
    ema_state: dict[str, torch.Tensor] | None = None,
    log=print,
    config_yaml: str | None = None,
) -> Path:
    """Collective: every rank calls it at the same step. `config_yaml` (the resolved training
    config) is kept with the weights so an export never pairs them with a later config."""
    import torch.distributed as dist
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    rank, world = dist.get_rank(), dist.get_world_size()
    root = checkpoints_root(output)
    ckpt = root / tag_for(step)
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if ckpt.exists():  # leftovers of an earlier attempt at this step (crash, or an older branch)
            shutil.rmtree(ckpt)
    dist.barrier()
    client_state = {
        "step": step,
        UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE},
    }
    engine.save_checkpoint(str(root), tag=ckpt.name, client_state=client_state, save_latest=False)
    write_atomic(rank_file(ckpt, rank), json.dumps(rank_state))
    if rank == 0 and config_yaml is not None:
        (ckpt / "config.yaml").write_text(config_yaml)
    if rank == 0 and ema_state is not None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in ema_state.items()}, str(ckpt / "ema.safetensors"))
    dist.barrier()
    if rank == 0:
        write_atomic(
            ckpt / COMPLETE,
            json.dumps({**meta, "step": step, "world_size": world, "ema": ema_state is not None}, indent=1),
        )
        write_atomic(root / "latest", ckpt.name)
        prune(output, keep, log)
        log(f"[checkpoint] saved {ckpt}")
    dist.barrier()
    return ckpt


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
