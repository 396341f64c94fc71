#!/usr/bin/env bash
# One node's share of a multi-node run: `bash cluster/node_launch.sh ARGS...` runs `deepspeed ARGS...`.
# cluster/slurm/train.sbatch starts it once per node (srun), cluster/k8s/train.yaml once per pod.
#
# Why not just `exec deepspeed`: with --no_ssh the DeepSpeed runner installs no signal handler,
# so SIGTERM (SLURM's time limit or preemption, a pod's deletion) kills the runner at once, and
# when the step or container ends with it the training ranks die before they can checkpoint.
# So the launcher gets its own process group, SIGTERM/SIGINT go to the whole group (the ranks
# save and exit; DeepSpeed's launch.py allows them 30 s before SIGKILL), and this script stays
# until every process of the group has exited.
#
# HIGEN_DRY_RUN=1 prints the deepspeed command instead of running it.
set -euo pipefail

if [[ -n "${HIGEN_DRY_RUN:-}" ]]; then
  printf 'deepspeed'
  printf ' %q' "$@"
  printf '\n'
  exit 0
fi

# A background child of a non-interactive shell is not a group leader, so setsid execs in place
# and $! is both the runner's pid and its new process group id.
setsid deepspeed "$@" &
group=$!
trap 'echo "node_launch: forwarding SIGTERM to the training processes" >&2; kill -TERM -- "-$group" 2>/dev/null || true' TERM INT

# A trapped signal interrupts `wait` (status > 128); keep waiting until the runner is gone,
# then ask once more for its real exit status.
while kill -0 "$group" 2>/dev/null; do
  wait "$group" || true
done
status=0
wait "$group" || status=$?

# The runner can be gone while ranks still write their checkpoint.
while kill -0 -- "-$group" 2>/dev/null; do
  sleep 1
done
exit "$status"
