#!/usr/bin/env bash
# Regenerates experiments/results/granularity.md: both halves of the ablation grid,
# then the table. About an hour on 2 CPU cores with the presets' recon.iters.
set -euo pipefail
cd "$(dirname "$0")/.."
packptq experiment=ablation_granularity "$@"
packptq experiment=ablation_granularity_deit "$@"
# the other Hessian loss choices where the paper's packing is compared with block-wise
packptq experiment=ablation_granularity packing=hessian packing.loss=ce,official quant=w3a3,w2a4 "$@"
python experiments/granularity_table.py multirun/ablation_granularity --out experiments/results
