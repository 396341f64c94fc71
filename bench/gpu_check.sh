#!/usr/bin/env bash
# The prepared device check of issue 17: at most 8 minutes on one H100/H200.
#
#   bench/gpu_check.sh                  # on a GPU machine: writes bench/results/gpu-<date>.md and .json
#   bench/gpu_check.sh --cpu-rehearsal  # every code path at tiny sizes on the CPU (no GPU figures)
#   bench/gpu_check.sh --sections encoders,unet --out DIR
#
# Needs the project's Python environment (ray, diffusers, timm, deepspeed, decord, av,
# torchcodec). Sections: encoders (VAE + DINOv2 throughput), prep (end-to-end per decoder
# backend), nvdec_path (the in-actor decode and its CPU fallback), unet (F=32 fwd+bwd, micro-batch
# 1 and 2), image (spatial-only, micro-batch 32), zero2 (5 steps through the deepspeed launcher).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
limit=480
for arg in "$@"; do
  if [ "$arg" = "--cpu-rehearsal" ]; then
    limit=${GPU_CHECK_REHEARSAL_TIMEOUT:-1800}  # a shared 2-core box is slow; GPU figures need none of it
    export DS_ACCELERATOR=cpu
  fi
done
exec timeout "$limit" "$PY" bench/gpu_check.py "$@"
