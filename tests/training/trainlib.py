"""Helpers of the training tests: paths, the real `deepspeed` launcher on CPU ranks (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from testing.net import free_port

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "train" / "tiny.yaml"
DEEPSPEED = Path(sys.executable).parent / "deepspeed"


def env() -> dict[str, str]:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def launch(script: str, ranks: int, args: list[str], timeout: int = 420) -> subprocess.CompletedProcess:
    """Run `script` under the real `deepspeed` launcher on `ranks` CPU processes (gloo); the
    result's `master_port` names the run's DeepSpeed shm buffers (`shm_leftovers`)."""
    port = free_port()
    cmd = [str(DEEPSPEED), "--num_gpus", str(ranks), "--master_port", str(port), script, *args]
    done = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)
    done.master_port = port  # type: ignore[attr-defined]
    return done


def shm_leftovers(port: int) -> list[Path]:
    """DeepSpeed CPU all-reduce buffers of the launch on `port` still named in /dev/shm."""
    return sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def start(script: str, ranks: int, args: list[str], log: Path) -> subprocess.Popen:
    cmd = [str(DEEPSPEED), "--num_gpus", str(ranks), "--master_port", str(free_port()), script, *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=log.open("w"), stderr=subprocess.STDOUT)


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--config",
        str(TINY),
        "--data",
        str(data),
        "--output",
        str(out),
        "train.tensorboard=false",
        *extra,
    ]


def tail(done: subprocess.CompletedProcess | str) -> str:
    text = done if isinstance(done, str) else done.stdout + done.stderr
    return text[-6000:]


def metrics(out: Path) -> list[dict]:
    """The run's metrics.jsonl (NaN is written as `NaN`, which json reads back as nan)."""
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
