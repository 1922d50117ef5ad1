#!/usr/bin/env bash
# Pack-wise mixed precision against uniform precision: the report in
# experiments/results/mixed_precision/ (packptq-report). Run from anywhere:  experiments/run_mp_sweep.sh
#
# Cases (settings in conf/experiment/mp_sweep.yaml and mp_sweep_deit.yaml):
#   mp=budget mp.avg_bits=2.5,3.0,3.5,4.0   exact knapsack at a true average, W3A3 target
#   mp=none quant.w_bits=2,3,4              uniform W2A2 / W3A3 / W4A4 baselines
#   mp=official                             the official rule, a (3+4)/2-bit budget
# on resnet18 with seeds 0,1,2 and deit_tiny with seed 0, plus seeds 1,2 of deit_tiny for the
# three cases of the headline comparison (budget 3.0, uniform W3A3, official).
#
# Two lanes of one job each run side by side (one torch thread per job): a 2-core machine.
# Runs land in multirun/mp_sweep/<model>/<overrides>/; rerunning the script resumes them from
# their artifacts (finished runs only re-evaluate). FP models are trained once and cached in
# ~/.cache/packptq (PACKPTQ_CACHE).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PACKPTQ_THREADS=1
LOGS=multirun/mp_sweep/logs
mkdir -p "$LOGS"

EXTRA=("$@")  # overrides for every run, e.g. recon.w_lr=1e-2
run() { packptq hydra.launcher.n_jobs=1 "$@" "${EXTRA[@]}" || echo "[run_mp_sweep] FAILED: $*" >&2; }

warm_fp() {  # one job per model first, so that no two jobs train the same FP model at once
  run experiment=mp_sweep mp=none quant.w_bits=3 seed=0 &
  run experiment=mp_sweep_deit mp=none quant.w_bits=3 seed=0 &
  wait
}

lane_a() {  # resnet18: the budget grid and the official rule (15 runs)
  run experiment=mp_sweep mp=budget mp.avg_bits=3.0
  run experiment=mp_sweep mp=official packing.loss=official
  run experiment=mp_sweep mp=budget mp.avg_bits=2.5,3.5,4.0
}

lane_b() {  # resnet18 uniform baselines, deit_tiny (8 + 6 runs)
  run experiment=mp_sweep mp=none quant.w_bits=3
  run experiment=mp_sweep_deit mp=budget mp.avg_bits=3.0
  run experiment=mp_sweep_deit mp=official packing.loss=official
  run experiment=mp_sweep mp=none quant.w_bits=2,4
  run experiment=mp_sweep_deit seed=1,2 mp=none quant.w_bits=3
  run experiment=mp_sweep_deit seed=1,2 mp=budget mp.avg_bits=3.0
  run experiment=mp_sweep_deit seed=1,2 mp=official packing.loss=official
  run experiment=mp_sweep_deit mp=budget mp.avg_bits=2.5,3.5,4.0
  run experiment=mp_sweep_deit mp=none quant.w_bits=2,4
}

start=$(date +%s)
warm_fp > "$LOGS/warm_fp.log" 2>&1
lane_a > "$LOGS/lane_a.log" 2>&1 &
lane_b > "$LOGS/lane_b.log" 2>&1 &
wait
echo "sweep wall time: $(( ($(date +%s) - start) / 60 )) min" | tee "$LOGS/wall_time.txt"

# The table and plots (top-1 against the achieved average weight bits, bits per pack) with the
# runs' records beside them; `packptq-report --check experiments/results` regenerates them.
packptq-report multirun/mp_sweep/resnet18 multirun/mp_sweep/deit_tiny_patch16_224 \
  --out experiments/results/mixed_precision
