#!/usr/bin/env bash
# profile=official beside profile=default on the embedded resnet18 (model=resnet18 data=mnist5k,
# its cached FP model): W4A4 / W3A3 / W2A4 x 3 seeds, then the official switches one at a time
# on top of the default profile at W3A3 (seed 0). One process at a time, one thread, the same
# reduced recon.iters for every run (equal steps). Usage:
#   bash experiments/run_profiles.sh [OUT]    (default OUT: multirun/profiles; ITERS=20)
# then (job 3 of main/ is profile=default W3A3 seed 0, the baseline of the switches):
#   packptq-report OUT/main --out experiments/results/profiles
#   packptq-report OUT/ablation OUT/main/3 --out experiments/results/profile_switches
set -euo pipefail
OUT=${1:-multirun/profiles}
ITERS=${ITERS:-20}
PACKPTQ=${PACKPTQ:-packptq}
COMMON="model=resnet18 data=mnist5k recon.iters=$ITERS threads=1 logger=none progress=false"
$PACKPTQ -m $COMMON profile=default,official quant=w4a4,w3a3,w2a4 seed=0,1,2 hydra.sweep.dir=$OUT/main
for sw in packing.loss=official quant.first_last_bits=null quant.range_grid=official \
          quant.act_init=quantized_batch recon.drop_units=packs data.calib_transform=train recon.batch_size=16; do
  $PACKPTQ -m $COMMON quant=w3a3 seed=0 "$sw" hydra.sweep.dir=$OUT/ablation hydra.sweep.subdir="${sw%%=*}"
done
