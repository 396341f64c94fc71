#!/usr/bin/env bash
# The whole system on one machine, CPU only, tiny models:
#   synthetic corpus -> a small VAE trained on it (so samples decode to pictures) -> Ray
#   preprocessing job -> 4-rank DeepSpeed training (1 image rank, 3 video ranks) -> stop + resume
#   -> sample a video -> a short configs/train/control.yaml run and its 3x3 γm x γa grid
#   (bench/controllability.py) -> dataset report.
# Usage: bash scripts/demo.sh [OUT_DIR]   (default demo_out/; rerunning starts afresh)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-demo_out}
bash scripts/setup.sh
PY=.venv/bin/python
export DS_ACCELERATOR=cpu PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 RAY_DEDUP_LOGS=0
rm -rf "$OUT"
mkdir -p "$OUT"
start=$(date +%s)
step() { printf '\n=== [%4ss] %s\n' "$(( $(date +%s) - start ))" "$*"; }

step "1/8 synthetic corpus (real h264/mpeg4/vp9 files, images, parquet manifests)"
$PY -m preprocessing.synthetic --out "$OUT/raw" --videos 24 --images 12 --bad --seconds 2

step "2/8 a small diffusers AutoencoderKL trained on the corpus' frames (models.vae=$OUT/vae)"
$PY -m preprocessing.tiny_vae --data "$OUT/raw" --out "$OUT/vae" --cpu-seconds 120

step "3/8 Ray preprocessing job (local Ray cluster) -> WebDataset shards"
$PY -m pipeline.prep --config configs/prep/tiny.yaml \
  --videos "$OUT/raw/videos.parquet" --images "$OUT/raw/images.parquet" --out "$OUT/shards" \
  models.vae="$OUT/vae"

step "4/8 DeepSpeed training, 4 CPU ranks (rank 3 is the image rank), stopped at step 6"
DS=(.venv/bin/deepspeed --num_gpus 4 --master_port 29533 training/train.py
    --config configs/train/tiny.yaml --data "$OUT/shards" --output "$OUT/run" --save-every 3)
"${DS[@]}" --max-steps 6 --resume none

step "5/8 resume from the newest complete checkpoint and train to step 10"
"${DS[@]}" --max-steps 10 --resume auto
$PY -m training.export --ckpt "$OUT/run" --out "$OUT/run/export" --trust-checkpoint  # our own run

step "6/8 two-stage sampling (spatial reasoning, then temporal reasoning with motion/appearance)"
$PY -m model.sample --config configs/sample/tiny.yaml --ckpt "$OUT/run" \
  --prompt "a red square moving fast to the right" --out "$OUT/sample.mp4" \
  --appearance 1.0 --steps 10 --seed 0 --gif vae="$OUT/vae"

step "7/8 a short configs/train/control.yaml run, sampled at 5 γm and 5 γa levels; 3x3 grid"
# The full recipe (1200 steps, ~10 min) is bench/controllability.py's; the demo trains a quarter
# of it: enough for the falling loss and decoded pictures, not yet for γm to steer the motion.
$PY bench/controllability.py --work "$OUT/control" --vae "$OUT/vae" --shards "$OUT/shards" \
  --max-steps 300 --seeds 2 || echo "(a 300-step run need not meet the full run's targets)"

step "8/8 dataset report"
$PY -m pipeline.report "$OUT/shards" --out "$OUT/report"

step "done"
cat <<EOF
Artefacts:
  corpus + manifests   $OUT/raw/
  shards               $OUT/shards/{videos,images}/NNNNNN.{tar,parquet,json}, $OUT/shards/dataset.json
  training run         $OUT/run/ (metrics.jsonl, tensorboard/, checkpoints/, config.yaml)
  exported weights     $OUT/run/export/{unet.safetensors,model.yaml}
  trained VAE          $OUT/vae/ (diffusers AutoencoderKL, tiny_vae.json)
  sampled video        $OUT/sample.mp4 (+ .gif, contact sheet .png)
  controls             $OUT/control/grid.png (3 γm x 3 γa), loss.png, results.md (the table)
  dataset report       $OUT/report/index.html, $OUT/report/report.md
EOF
