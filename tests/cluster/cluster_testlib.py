"""Shared helpers for the cluster recipe tests: paths, YAML loading, fake cluster tools."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
VENV_BIN = Path(sys.executable).parent
SHELLCHECK = VENV_BIN / "shellcheck"
# The one image every recipe must run.
IMAGE = "ghcr.io/higen-project/higen:0.1.0"


def load_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def fake_bin(directory: Path, tools: dict[str, str]) -> Path:
    """Write executable bash stand-ins for cluster tools (srun, scontrol, getent, deepspeed)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, body in tools.items():
        tool = directory / name
        tool.write_text("#!/usr/bin/env bash\n" + body)
        tool.chmod(0o755)
    return directory


def script_env(extra: dict[str, str], fake: Path | None = None) -> dict[str, str]:
    """A clean environment: the venv's python first, SLURM/k8s variables only from `extra`."""
    path = [str(VENV_BIN), "/usr/local/bin", "/usr/bin", "/bin"]
    if fake is not None:
        path.insert(0, str(fake))
    env = {"PATH": os.pathsep.join(path), "HOME": os.environ.get("HOME", "/tmp"), "LANG": "C.UTF-8"}
    env.update(extra)
    return env


def run(cmd: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def expand_k8s_refs(text: str, env: dict[str, str]) -> str:
    """Kubernetes' own `$(VAR)` expansion of command/args, so a test sees what the pod runs."""

    def sub(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env.get(name, match.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, text)


def deepspeed_lines(output: str) -> list[list[str]]:
    """The `deepspeed ...` commands node_launch.sh prints in dry-run mode, as argv lists."""
    return [shlex.split(line)[1:] for line in output.splitlines() if line.startswith("deepspeed ")]
