#!/usr/bin/env bash
# The granularity ablation: both halves of the grid, then the report in
# experiments/results/granularity/ (packptq-report, records beside it). About an hour on 2 CPU cores with the presets' recon.iters.
set -euo pipefail
cd "$(dirname "$0")/.."
packptq experiment=ablation_granularity "$@"
packptq experiment=ablation_granularity_deit "$@"
# the other Hessian loss choices where the paper's packing is compared with block-wise
packptq experiment=ablation_granularity packing=hessian packing.loss=ce,official quant=w3a3,w2a4 "$@"
packptq-report multirun/ablation_granularity --out experiments/results/granularity
