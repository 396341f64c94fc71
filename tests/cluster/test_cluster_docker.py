"""cluster/Dockerfile: Docker cannot run here, so check its structure and what it relies on."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys

import tomllib
from cluster_testlib import CLUSTER, REPO, load_docs
from packaging.requirements import Requirement

DOCKERFILE = CLUSTER / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") or (not line.strip() and not pending):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, rest = pending.strip().partition(" ")
        out.append((keyword.upper(), rest.strip()))
        pending = ""
    assert not pending, "Dockerfile ends inside a continued line"
    return out


def _args() -> dict[str, str]:
    return dict(rest.split("=", 1) for keyword, rest in _instructions() if keyword == "ARG" and "=" in rest)


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_known_instructions_only() -> None:
    known = {"FROM", "ARG", "ENV", "RUN", "COPY", "WORKDIR", "USER", "ENTRYPOINT", "CMD"}
    assert {keyword for keyword, _ in _instructions()} <= known
    assert _instructions()[0][0] in {"FROM", "ARG"}


def test_cuda_base_matches_torch_wheels() -> None:
    [base] = [rest for keyword, rest in _instructions() if keyword == "FROM"]
    image = re.sub(r"\$\{(\w+)\}", lambda m: _args()[m.group(1)], base)
    assert image.startswith("nvidia/cuda:") and "cudnn" in image and "ubuntu" in image
    cuda_major = re.search(r":(\d+)\.\d+", image).group(1)
    torch_cuda = re.search(r"/whl/cu(\d+)$", _args()["TORCH_INDEX_URL"]).group(1)
    assert torch_cuda[:-1] == cuda_major, (image, torch_cuda)


def test_python_311_venv_and_environment() -> None:
    runs = " ".join(rest for keyword, rest in _instructions() if keyword == "RUN")
    assert "python3.11 -m venv" in runs and "python3.11-dev" in runs
    env = " ".join(rest for keyword, rest in _instructions() if keyword == "ENV")
    assert "PYTHONUNBUFFERED=1" in env
    assert "PATH=/opt/venv/bin:" in env
    # Tools the recipes call inside the image.
    for tool in ("wget", "rsync", "procps", "util-linux", "tini"):
        assert re.search(rf"\s{re.escape(tool)}\s", runs), tool


def test_installs_the_project_then_drops_root() -> None:
    steps = _instructions()
    workdir = [rest for keyword, rest in steps if keyword == "WORKDIR"]
    assert workdir == ["/opt/higen"]
    copy_all = steps.index(("COPY", ". ."))
    install = next(i for i, (keyword, rest) in enumerate(steps)
                   if keyword == "RUN" and re.search(r"pip install --no-deps \.(\s|$)", rest))
    assert copy_all < install
    users = [(i, rest) for i, (keyword, rest) in enumerate(steps) if keyword == "USER"]
    assert users and users[-1][1] not in {"root", "0"}
    last_run = max(i for i, (keyword, _) in enumerate(steps) if keyword == "RUN")
    assert users[-1][0] > last_run


def test_dependency_layer_reads_pyproject(tmp_path) -> None:
    """Run the Dockerfile's own requirements extraction against the real pyproject.toml."""
    run = next(rest for keyword, rest in _instructions() if keyword == "RUN" and "tomllib" in rest)
    argv = shlex.split(run.split(">", 1)[0])
    assert argv[:2] == ["python", "-c"]
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    result = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:-1] == _pyproject()["project"]["dependencies"]
    assert ("COPY", "pyproject.toml ./") in _instructions()


def test_pinned_ray_satisfies_pyproject() -> None:
    ray = next(Requirement(d) for d in _pyproject()["project"]["dependencies"] if d.startswith("ray"))
    assert ray.specifier.contains(_args()["RAY_VERSION"])


def test_recipes_use_the_image_workdir() -> None:
    """Code and configs live in the image's WORKDIR; every recipe must look there."""
    [workdir] = [rest for keyword, rest in _instructions() if keyword == "WORKDIR"]
    [job, *_] = [d for d in load_docs(CLUSTER / "k8s" / "train.yaml") if d["kind"] == "Job"]
    assert job["spec"]["template"]["spec"]["containers"][0]["workingDir"] == workdir
    assert f"--container-workdir={workdir}" in (CLUSTER / "slurm" / "train.sbatch").read_text()
    [rayjob] = load_docs(CLUSTER / "ray" / "rayjob.yaml")
    assert f"--config {workdir}/configs/" in rayjob["spec"]["entrypoint"]


def test_dockerignore_keeps_the_context_small() -> None:
    patterns = [line.strip() for line in (CLUSTER / "Dockerfile.dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert {".git", ".venv"} <= set(patterns)
    # Nothing the image build copies explicitly may be ignored.
    assert "pyproject.toml" not in patterns and "cluster" not in patterns
