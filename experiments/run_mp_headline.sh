#!/usr/bin/env bash
# The mixed-precision headline at equal weight and activation averages (resnet18 on the
# embedded MNIST-5k, W3A3 target, block-wise reconstruction, 3 seeds), with the rounding
# learning rate chosen on the validation split (500 training samples held out of calibration).
# Writes experiments/results/mp_headline.md. Usage: bash experiments/run_mp_headline.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-multirun/mp_headline}
common="experiment=mp_sweep data.val_size=500"
# 1. w_lr by mean validation top-1 over seeds 0-2 (one seed's 500 digits separate the rates by a
#    digit or two), uniform W3A3; ties go to the smaller rate
packptq $common mp=none recon.w_lr=3e-3,1e-2,3e-2 seed=0,1,2 hydra.sweep.dir=$out/choose_lr
lr=$(python - "$out/choose_lr" <<'PY'
import json, pathlib, statistics, sys
runs = [json.loads(p.read_text()) for p in pathlib.Path(sys.argv[1]).glob("*/results.json")]
by_lr = {}
for r in runs:
    by_lr.setdefault(r["config"]["recon"]["w_lr"], []).append(r["val_top1"])
print(max(by_lr, key=lambda lr: (statistics.mean(by_lr[lr]), -lr)))
PY
)
echo "w_lr chosen on validation: $lr"
# 2. uniform W3A3, 3 seeds; its achieved averages (first/last layer at 8 bits included) are the
#    budget of the mixed-precision rows: weights and activations each at most the uniform model's
packptq $common recon.w_lr=$lr mp=none seed=0,1,2 hydra.sweep.dir=$out/headline
read -r wavg aavg < <(python - "$out/headline" <<'PY'
import json, pathlib, sys
r = json.loads(next(pathlib.Path(sys.argv[1]).glob("*mp=none*/results.json")).read_text())
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
python experiments/mp_headline_table.py "$out" > experiments/results/mp_headline.md
