"""Where training checkpoints live and which of them are complete.

Training writes checkpoints; sampling and export find them. Both import this module, so the
model package never imports training. Layout (docs/training.md): `OUTPUT/checkpoints/
step_XXXXXXX/` with DeepSpeed's files, one `rank_NNNNN.json` per rank and, written last,
`complete.json`, which records the size of every file of the save (verified on load).

DeepSpeed's loaders unpickle (`torch.load(weights_only=False)`), so a DeepSpeed checkpoint is
code: one from outside the run's own output is loaded only when the user says it is trusted.
Safetensors exports hold tensors only and load from anywhere.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Any

COMPLETE = "complete.json"


class ResumeError(ValueError):
    """`--resume PATH` names something that cannot be resumed from."""


class UntrustedCheckpointError(ResumeError):
    """A DeepSpeed checkpoint from outside the run's own output, not marked as trusted."""


def checkpoints_root(output: str | Path) -> Path:
    return Path(output) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


def rank_file(ckpt: Path, rank: int) -> Path:
    return ckpt / f"rank_{rank:05d}.json"


def fsync_path(path: str | Path) -> None:
    """Flush a file (or a directory's entries) to the device: a checkpoint must survive a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, data: str | bytes) -> int:
    """Write, fsync; returns the size in bytes."""
    raw = data.encode() if isinstance(data, str) else data
    with open(path, "wb") as f:
        f.write(raw)
        f.flush()
        os.fsync(f.fileno())
    return len(raw)


def write_atomic(path: Path, text: str) -> None:
    """Readers see the old or the new content, never a torn file, also after a power cut."""
    tmp = path.with_name(path.name + ".tmp")
    write_durable(tmp, text)
    os.replace(tmp, path)
    fsync_path(path.parent)


def check_complete(ckpt: Path) -> str | None:
    """None when `ckpt` is a complete checkpoint, else why not."""
    marker = ckpt / COMPLETE
    if not marker.is_file():
        return f"no {COMPLETE} (the save did not finish)"
    try:
        meta = json.loads(marker.read_text())
        world = int(meta["world_size"])
    except (ValueError, KeyError) as err:
        return f"unreadable {COMPLETE}: {err}"
    missing = [rank_file(ckpt, r).name for r in range(world) if not rank_file(ckpt, r).is_file()]
    optim = glob.glob(str(ckpt / "*optim_states.pt"))
    if len(optim) != world:
        missing.append(f"optimizer states ({len(optim)} of {world} files)")
    if not glob.glob(str(ckpt / "*model_states.pt")):
        missing.append("model states")
    if meta.get("ema") and not (ckpt / "ema.safetensors").is_file():
        missing.append("ema.safetensors")
    if missing:
        return f"missing {', '.join(missing)}"
    # Sizes recorded at save time (older checkpoints have none): a truncated file is not complete.
    for name, size in sorted(meta.get("files", {}).items()):
        path = ckpt / name
        if not path.is_file():
            return f"missing {name}"
        if path.stat().st_size != int(size):
            got = path.stat().st_size
            return f"{name} has {got} bytes, {COMPLETE} recorded {size} (truncated or replaced)"
    return None


def list_checkpoints(output: str | Path) -> list[tuple[int, Path]]:
    out = []
    for path in checkpoints_root(output).glob("step_*"):
        suffix = path.name[len("step_") :]
        if path.is_dir() and suffix.isdigit():
            out.append((int(suffix), path))
    return sorted(out)


def find_latest_complete(output: str | Path, log=print) -> Path | None:
    for _, path in reversed(list_checkpoints(output)):
        why = check_complete(path)
        if why is None:
            return path
        log(f"[checkpoint] ignoring incomplete {path}: {why}")
    return None


def resolve_resume(resume: str, output: str | Path, log=print) -> Path | None:
    """`auto` -> newest complete checkpoint or None; `none` -> None; a path -> that checkpoint."""
    if resume == "none":
        return None
    if resume == "auto":
        return find_latest_complete(output, log)
    path = Path(resume)
    if path.name == "checkpoints" or (path / "checkpoints").is_dir():  # an output or checkpoints dir
        found = find_latest_complete(path.parent if path.name == "checkpoints" else path, log)
        if found is None:
            raise ResumeError(f"--resume {resume}: no complete checkpoint under it")
        return found
    why = check_complete(path) if path.is_dir() else "not a directory"
    if why is not None:
        raise ResumeError(
            f"--resume {resume}: not a complete checkpoint ({why}); use --resume auto or another one"
        )
    return path


def check_trusted(
    path: str | Path, output: str | Path | None, trust: bool, flag: str = "--trust-checkpoint"
) -> None:
    """Refuse a DeepSpeed checkpoint outside `output` (the run's own directory) unless trusted."""
    if trust:
        return
    resolved = Path(path).resolve()
    if output is not None and resolved.is_relative_to(Path(output).resolve()):
        return
    raise UntrustedCheckpointError(
        f"{path} is a DeepSpeed checkpoint from outside this run's output {output}: DeepSpeed loads it "
        f"with pickle, which can run arbitrary code. If you trust where it came from, pass {flag}; "
        f"otherwise start from its safetensors export (model.init=EXPORT/unet.safetensors), which "
        f"holds tensors only and loads from anywhere"
    )


def checkpoint_meta(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / COMPLETE).read_text())
