#!/usr/bin/env bash
# Pack-wise mixed precision against uniform precision, the table and plot in
# experiments/results/mixed_precision.md. Run from anywhere:  experiments/run_mp_sweep.sh
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

OUT=experiments/results/mixed_precision
packptq-report multirun/mp_sweep/resnet18 multirun/mp_sweep/deit_tiny_patch16_224 --out "$OUT"

# The figure of mixed_precision.md (top-1 against the achieved average weight bits, one panel
# per model) and the headline rows, from the report's summary.csv.
python - "$OUT" > "$OUT/headline.md" <<'PY'
import sys
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from packptq.report import load_report

out = Path(sys.argv[1])
_, s = load_report(out)
s = s.sort_values(["model", "mp_policy", "w_bits_avg_mean"])
fig = Figure(figsize=(10, 4), layout="constrained")
styles = {"none": ("s", "-", "uniform WkAk"), "budget": ("o", "-", "budget (exact, W3A3 target)"),
          "official": ("*", "none", "official rule")}
for ax, (model, g) in zip(fig.subplots(1, s["model"].nunique(), squeeze=False).flat, s.groupby("model")):
    for policy, (marker, ls, label) in styles.items():
        r = g[g["mp_policy"] == policy]
        if r.empty:
            continue
        ax.errorbar(r["w_bits_avg_mean"], r["quant_top1_mean"], yerr=r["quant_top1_std"].fillna(0),
                    marker=marker, ls=ls, ms=9 if marker == "*" else 6, capsize=3, label=label)
        for _, row in r.iterrows():
            tag = f"{row['mp_avg_bits']:g}" if policy == "budget" else f"W{row['w_bits']:g}" if policy == "none" else ""
            ax.annotate(f"{tag} A{row['a_bits_avg_mean']:.2f} (n={row['n_seeds']})",
                        (row["w_bits_avg_mean"], row["quant_top1_mean"]),
                        textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.axhline(g["fp_top1_mean"].mean(), ls="--", lw=0.8, color="grey", label="FP")
    ax.set_title(f"{model} on MNIST-5k", fontsize=9)
    ax.set_xlabel("achieved avg weight bits (first/last at 8 count)\nlabel: target, A = achieved avg activation bits")
    ax.set_ylabel("top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
fig.savefig(out.parent / "mixed_precision.png", dpi=120)

fmt = lambda m, sd, d=2: f"{m:.{d}f}" + ("" if pd.isna(sd) else f" ± {sd:.{d}f}")
head = (((s["mp_policy"] == "budget") & (s["mp_avg_bits"] == 3.0)) | (s["mp_policy"] == "official")
        | ((s["mp_policy"] == "none") & (s["w_bits"] == 3)))
print("| model | mp | budget (bits/weight) | achieved W bits | A bits | size (KiB) | top-1 (%) | seeds |")
print("|---|---|---|---|---|---|---|---|")
for _, r in s[head].iterrows():
    budget = "-" if pd.isna(r["mp_avg_bits"]) else f"{r['mp_avg_bits']:g}"
    print(f"| {r['model']} | {r['mp_policy'] if r['mp_policy'] != 'none' else 'uniform W3A3'} | {budget} | "
          f"{fmt(r['w_bits_avg_mean'], r['w_bits_avg_std'], 4)} | {fmt(r['a_bits_avg_mean'], r['a_bits_avg_std'], 3)} | "
          f"{r['size_bytes_mean'] / 1024:.0f} | {fmt(r['quant_top1_mean'], r['quant_top1_std'])} | {r['n_seeds']} |")
PY
{
  echo "# Pack-wise mixed precision vs uniform precision"
  echo
  echo "Generated by experiments/run_mp_sweep.sh from the runs' results.json; top-1 in %, mean ± std"
  echo "over seeds (n in the last column), achieved average weight bits over all quantized weights"
  echo "(first/last layer at 8 bits count), activations following each pack's bits."
  echo
  echo "## Weight budgets vs uniform W3A3 vs the official rule"
  echo
  echo "The budget here binds weights only; activations follow their pack's bits, so the rows differ in"
  echo "average activation bits (A bits column). The comparison at equal weight and activation averages,"
  echo "with the learning rate chosen on validation, is experiments/results/mp_headline.md."
  echo
  cat "$OUT/headline.md"
  echo
  echo "![top-1 against achieved average weight bits](mixed_precision.png)"
  echo
  echo "## Every case"
  echo
  cat "$OUT/summary.md"
  if [ -f experiments/results/mixed_precision_notes.md ]; then echo; cat experiments/results/mixed_precision_notes.md; fi
} > experiments/results/mixed_precision.md
