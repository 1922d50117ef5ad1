#!/usr/bin/env bash
# The mixed-precision headline at equal weight and activation averages (resnet18 on the
# embedded MNIST-5k, W3A3 target, block-wise reconstruction, 3 seeds), with the rounding
# learning rate chosen on the validation split (500 training samples held out of calibration).
# Writes the reports experiments/results/mp_headline_lr/ (the rate choice) and
# experiments/results/mp_headline/ (packptq-report, records beside each). Usage: bash experiments/run_mp_headline.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-multirun/mp_headline}
common="experiment=mp_sweep data.val_size=500"
# 1. w_lr by mean validation top-1 over seeds 0-2 (one seed's 500 digits separate the rates by a
#    digit or two), uniform W3A3; ties go to the smaller rate
packptq $common mp=none recon.w_lr=3e-3,1e-2,3e-2 seed=0,1,2 hydra.sweep.dir=$out/choose_lr
packptq-report "$out/choose_lr" --out experiments/results/mp_headline_lr
lr=$(python - <<'PY'
from packptq.report import load_report
_, s = load_report("experiments/results/mp_headline_lr")
best = s.sort_values(["val_top1_mean", "recon.w_lr"], ascending=[False, True]).iloc[0]
print(best["recon.w_lr"])
PY
)
echo "w_lr chosen on validation: $lr"
# 2. uniform W3A3, 3 seeds; its achieved averages (first/last layer at 8 bits included) are the
#    budget of the mixed-precision rows: weights and activations each at most the uniform model's
packptq $common recon.w_lr=$lr mp=none seed=0,1,2 hydra.sweep.dir=$out/headline
read -r wavg aavg < <(python - "$out/headline" <<'PY'
import sys
from packptq.report import collect
runs = collect([sys.argv[1]])
r = runs[runs["mp_policy"] == "none"].iloc[0]
print(r["w_bits_avg"], r["a_bits_avg"])
PY
)
echo "budget: $wavg bits per weight, $aavg bits per activation"
# 3. the exact budget at those averages, 3 seeds
packptq $common recon.w_lr=$lr mp=budget mp.avg_bits=$wavg mp.a_avg_bits=$aavg seed=0,1,2 \
  hydra.sweep.dir=$out/headline
# 4. the exact weight budget with every activation at the target bits (mp.acts=fixed): the
#    activation average is the uniform model's by construction
packptq $common recon.w_lr=$lr mp=budget mp.acts=fixed mp.avg_bits=$wavg seed=0,1,2 \
  hydra.sweep.dir=$out/headline
packptq-report "$out/headline" --out experiments/results/mp_headline
