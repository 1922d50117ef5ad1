#!/usr/bin/env bash
# The CPU method table (conf/experiment/cpu_methods.yaml): resnet18 and mobilenetv2_100 on 32x32
# MNIST-5k, W2A4 and W3A3, RTN / AdaRound / BRECQ / QDrop / Pack-PTQ (packptq's and the official
# profile) / Pack-PTQ + MP, 3 seeds. Two steps, each one multirun (two jobs side by side, one
# thread each):
#   1. recon.w_lr on the validation split: 1e-3, 3e-3, 1e-2, 3e-2, 1e-1 for BRECQ and Pack-PTQ on both models
#      and both bit settings, seed 0; the rate with the highest mean validation top-1 is kept
#      (the test split plays no part in the choice);
#   2. the table at that rate, and the two Pack-PTQ profiles at W4A4 on resnet18.
# Usage: bash experiments/run_cpu_methods.sh [OUT]   (default OUT: multirun/cpu_methods)
# Reports: experiments/results/cpu_methods_lr (the choice) and experiments/results/cpu_methods (the table).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-multirun/cpu_methods}
export OMP_WAIT_POLICY=PASSIVE  # idle OpenMP threads sleep: two one-thread jobs share 2 cores
COMMON=(experiment=cpu_methods model=resnet18,mobilenetv2_100 quant=w2a4,w3a3)

packptq -m "${COMMON[@]}" method=brecq,packptq recon.w_lr=1e-3,3e-3,1e-2,3e-2,1e-1 seed=0 hydra.sweep.dir="$OUT/tune"
packptq-report "$OUT/tune" --out experiments/results/cpu_methods_lr
LR=$(python - experiments/results/cpu_methods_lr/results.csv <<'PY'
import sys
import pandas as pd
runs = pd.read_csv(sys.argv[1])
print(runs.groupby("recon.w_lr")["val_top1"].mean().idxmax())
PY
)
echo "[run_cpu_methods] recon.w_lr=$LR (highest mean validation top-1)"
packptq -m "${COMMON[@]}" method=rtn,adaround,brecq,qdrop,packptq,packptq_official,packptq_mp \
  seed=0,1,2 recon.w_lr="$LR" hydra.sweep.dir="$OUT/table"
# the two Pack-PTQ profiles at W4A4 too (resnet18), for profile=official beside packptq's
packptq -m experiment=cpu_methods model=resnet18 quant=w4a4 method=packptq,packptq_official seed=0,1,2 \
  recon.w_lr="$LR" hydra.sweep.dir="$OUT/w4a4"
packptq-report "$OUT/table" "$OUT/w4a4" --out experiments/results/cpu_methods
