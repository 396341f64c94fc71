"""cluster/slurm/train.sbatch and cluster/node_launch.sh, run with faked SLURM tools."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest
from cluster_testlib import CLUSTER, REPO, SHELLCHECK, deepspeed_lines, fake_bin, run, script_env
from deepspeed.launcher.runner import fetch_hostfile, parse_args

from training.train import parse_args as train_parse_args

SBATCH = CLUSTER / "slurm" / "train.sbatch"
NODE_LAUNCH = CLUSTER / "node_launch.sh"


@pytest.mark.parametrize("script", [SBATCH, NODE_LAUNCH], ids=lambda p: p.name)
def test_shellcheck(script: Path) -> None:
    result = subprocess.run([str(SHELLCHECK), "--shell=bash", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_sbatch_directives() -> None:
    directives = [line.split(None, 1)[1] for line in SBATCH.read_text().splitlines()
                  if line.startswith("#SBATCH")]
    assert "--requeue" in directives
    assert "--signal=B:USR1@120" in directives
    assert "--ntasks-per-node=1" in directives
    # sbatch stops reading directives at the first command.
    lines = SBATCH.read_text().splitlines()
    last_directive = max(i for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    assert all(line.startswith("#") or not line.strip() for line in lines[1:last_directive])


def _slurm_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "node[01-03,07]",
        "SLURM_GPUS_PER_NODE": "h100:8",
        "SLURM_SUBMIT_DIR": str(REPO),
        "HIGEN_DATA": "s3://bucket/higen/shards",
        "HIGEN_OUTPUT": str(tmp_path / "run"),
    }
    env.update(extra)
    return env


def _srun_task_argv(srun_line: str) -> list[str]:
    """The per-node command of the printed srun line: everything after srun's own options."""
    argv = shlex.split(srun_line)
    assert argv[0] == "srun"
    first = next(i for i, arg in enumerate(argv) if i > 0 and not arg.startswith("--"))
    return argv[first:]


def test_dry_run_builds_hostfile_and_deepspeed_commands(tmp_path) -> None:
    env = script_env(_slurm_env(tmp_path, HIGEN_DRY_RUN="1"))
    result = run(["bash", str(SBATCH), "--max-steps", "100"], env)
    assert result.returncode == 0, result.stderr

    hostfile = tmp_path / "run" / "hostfile.4242"
    assert hostfile.read_text() == "node01 slots=8\nnode02 slots=8\nnode03 slots=8\nnode07 slots=8\n"
    srun_line = result.stdout.strip().splitlines()[-1]
    assert "--nodes=4" in shlex.split(srun_line)
    assert "--kill-on-bad-exit=1" in shlex.split(srun_line)

    # Run the task command as srun would on node 2 (SLURM_NODEID=2); node_launch.sh prints it.
    node_env = script_env({"SLURM_NODEID": "2", "HIGEN_DRY_RUN": "1"})
    node = run(_srun_task_argv(srun_line), node_env)
    assert node.returncode == 0, node.stderr
    [argv] = deepspeed_lines(node.stdout)
    args = parse_args(argv)  # DeepSpeed's own launcher parser
    assert args.no_ssh and args.node_rank == 2
    assert args.hostfile == str(hostfile)
    assert args.master_addr == "node01"
    assert args.master_port == 20000 + 4242 % 20000
    assert args.user_script == "training/train.py"
    train = train_parse_args(args.user_args)  # and training/train.py's parser
    assert train.data == "s3://bucket/higen/shards"
    assert train.output == str(tmp_path / "run")
    assert train.config == "configs/train/default.yaml" and (REPO / train.config).is_file()
    assert train.resume == "auto"
    assert train.max_steps == 100
    assert len(fetch_hostfile(args.hostfile)) == 4


def test_dry_run_with_container_and_gpu_override(tmp_path) -> None:
    env = script_env(_slurm_env(tmp_path, HIGEN_DRY_RUN="1", HIGEN_GPUS_PER_NODE="4",
                                HIGEN_CONTAINER_IMAGE="ghcr.io/higen-project/higen:0.1.0"))
    result = run(["bash", str(SBATCH)], env)
    assert result.returncode == 0, result.stderr
    argv = shlex.split(result.stdout.strip().splitlines()[-1])
    assert "--container-image=ghcr.io/higen-project/higen:0.1.0" in argv
    assert f"--container-mounts={tmp_path / 'run'}:{tmp_path / 'run'}" in argv
    assert (tmp_path / "run" / "hostfile.4242").read_text().count("slots=4") == 4


@pytest.mark.parametrize(
    "drop, extra, message",
    [
        ("HIGEN_DATA", {}, "set HIGEN_DATA"),
        ("SLURM_JOB_ID", {}, "not inside a SLURM allocation"),
        ("SLURM_GPUS_PER_NODE", {}, "GPUs per node unknown"),
        (None, {"HIGEN_OUTPUT": "s3://bucket/ckpt"}, "shared filesystem path"),
        (None, {"SLURM_JOB_NODELIST": "node[3-1]"}, "runs backwards"),
    ],
)
def test_sbatch_explains_bad_setup(tmp_path, drop: str | None, extra: dict, message: str) -> None:
    env = _slurm_env(tmp_path, HIGEN_DRY_RUN="1", **extra)
    env.pop(drop, None)
    result = run(["bash", str(SBATCH)], script_env(env))
    assert result.returncode != 0
    assert message in result.stderr


# srun stand-in: logs its command, passes SIGTERM on like srun does, then exits.
FAKE_SRUN = """echo "srun $*" >> "$HIGEN_TEST_LOG"
trap 'echo "srun got TERM" >> "$HIGEN_TEST_LOG"; exit 143' TERM
echo "srun running" >> "$HIGEN_TEST_LOG"
for _ in $(seq 600); do sleep 0.1; done
"""
FAKE_SCONTROL = """case "$1" in
  show) printf 'cn-a\\ncn-b\\n' ;;
  requeue) echo "scontrol requeue $2" >> "$HIGEN_TEST_LOG" ;;
  *) exit 1 ;;
esac
"""


@pytest.fixture
def spawn():
    """Popen in a new session; whatever a test leaves running is killed afterwards."""
    groups: list[int] = []

    def start(cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
        groups.append(proc.pid)
        return proc

    yield start
    for group in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)


def _start_sbatch(spawn, tmp_path: Path, **extra: str) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / "log"
    log.touch()
    fake = fake_bin(tmp_path / "bin", {"srun": FAKE_SRUN, "scontrol": FAKE_SCONTROL})
    env = script_env(_slurm_env(tmp_path, HIGEN_TEST_LOG=str(log), **extra), fake)
    proc = spawn(["bash", str(SBATCH)], env)
    _wait_for(log, "srun running", proc)
    return proc, log


def _wait_for(log: Path, text: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while text not in log.read_text():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{text!r} never appeared in {log.read_text()!r}"
        time.sleep(0.05)


def test_usr1_checkpoints_then_requeues(spawn, tmp_path) -> None:
    proc, log = _start_sbatch(spawn, tmp_path)
    proc.send_signal(signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=30)
    lines = log.read_text().splitlines()
    # scontrol (faked) supplied the hosts, not the python fallback.
    assert (tmp_path / "run" / "hostfile.4242").read_text() == "cn-a slots=8\ncn-b slots=8\n"
    assert lines.index("srun got TERM") < lines.index("scontrol requeue 4242"), lines
    assert "requeueing job 4242" in stderr


def test_plain_sigterm_does_not_requeue(spawn, tmp_path) -> None:
    proc, log = _start_sbatch(spawn, tmp_path)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    lines = log.read_text().splitlines()
    assert "srun got TERM" in lines
    assert not any(line.startswith("scontrol requeue") for line in lines)


def test_requeue_limit(spawn, tmp_path) -> None:
    proc, log = _start_sbatch(spawn, tmp_path, SLURM_RESTART_COUNT="3", HIGEN_MAX_REQUEUES="3")
    proc.send_signal(signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=30)
    assert "srun got TERM" in log.read_text()
    assert "scontrol requeue" not in log.read_text()
    assert "HIGEN_MAX_REQUEUES=3" in stderr


# deepspeed stand-in shaped like the real runner with --no_ssh: no signal handler of its own,
# one child "rank" that needs a moment to save its checkpoint after SIGTERM.
FAKE_DEEPSPEED = """echo "deepspeed $* (group $$)" >> "$HIGEN_TEST_LOG"
bash -c 'trap "sleep 1; echo rank saved >> \\"$HIGEN_TEST_LOG\\"; exit 0" TERM
echo "rank running" >> "$HIGEN_TEST_LOG"
for _ in $(seq 600); do sleep 0.1; done' &
wait
"""


def test_node_launch_lets_ranks_checkpoint(spawn, tmp_path) -> None:
    log = tmp_path / "log"
    log.touch()
    fake = fake_bin(tmp_path / "bin", {"deepspeed": FAKE_DEEPSPEED})
    env = script_env({"HIGEN_TEST_LOG": str(log)}, fake)
    proc = spawn(["bash", str(NODE_LAUNCH), "--no_ssh", "train.py"], env)
    _wait_for(log, "rank running", proc)
    # The runner's own process group, for the fixture to clean up if node_launch.sh leaks it.
    spawn_group = int(re.search(r"\(group (\d+)\)", log.read_text()).group(1))
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    # node_launch.sh must outlive the rank's checkpoint, not just the runner.
    text = log.read_text()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(spawn_group, signal.SIGKILL)
    assert "rank saved" in text
    assert "deepspeed --no_ssh train.py" in text


def test_node_launch_passes_exit_status(tmp_path) -> None:
    fake = fake_bin(tmp_path / "bin", {"deepspeed": "exit 3\n"})
    result = run(["bash", str(NODE_LAUNCH), "x"], script_env({}, fake))
    assert result.returncode == 3
