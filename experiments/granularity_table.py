"""Build experiments/results/granularity.md from the granularity-ablation multiruns:
mean ± std top-1 per (model, quant, packing) cell, the packs found, and wall time per run.

    python experiments/granularity_table.py multirun/ablation_granularity [--out experiments/results]
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import pandas as pd

from packptq.report import collect, summarize

ORDER = ["none", "layer", "block", "hessian", "hessian (steps per block)", "hessian (ce)", "hessian (official)",
         "random", "net"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--out", default="experiments/results")
    args = ap.parse_args()
    df = collect(args.dirs)
    # Hessian packing under the other loss choices gets rows of its own: "hessian (ce)"
    other = (df["packing_policy"] == "hessian") & (df["packing_loss"].fillna("kl") != "kl")
    df.loc[other, "packing_policy"] = "hessian (" + df.loc[other, "packing_loss"] + ")"
    # ... and so does Hessian packing given its blocks' steps (recon.iters_per=block: equal compute)
    per_block = [json.loads((Path(rd) / "results.json").read_text())["config"]["recon"].get("iters_per") == "block"
                 for rd in df["run_dir"]]
    df.loc[per_block, "packing_policy"] = df.loc[per_block, "packing_policy"] + " (steps per block)"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "granularity.csv", index=False)
    lines = ["# Reconstruction granularity", "",
             "Top-1 (%) on the 1,000 held-out embedded MNIST digits, mean ± std over seeds 0, 1, 2",
             "(calibration samples and reconstruction randomness change with the seed; the FP model",
             "is the same). W bits / A bits as named, first and last layer at 8 bits, activation",
             "quantizers on layer inputs, 256 calibration images, recon.iters as in the preset.", ""]
    for model, g in df.groupby("model"):
        fp = g["fp_top1"].iloc[0]
        lines += [f"## {model} (FP top-1 {fp:.2f}%)", ""]
        quants = sorted(g["w_bits"].astype(int).astype(str).str.cat(g["a_bits"].astype(int).astype(str), sep="/").unique(),
                        reverse=True)
        g = g.assign(q=g["w_bits"].astype(int).astype(str) + "/" + g["a_bits"].astype(int).astype(str))
        pols = [p for p in ORDER if p in set(g["packing_policy"])]
        lines.append("| packing | " + " | ".join(f"W{q.split('/')[0]}A{q.split('/')[1]}" for q in quants) + " | mean s/run |")
        lines.append("|---|" + "---|" * (len(quants) + 1))
        for p in pols:
            cells = []
            for q in quants:
                v = g[(g.packing_policy == p) & (g.q == q)]["quant_top1"]
                cells.append(f"{v.mean():.2f} ± {v.std(ddof=1):.2f} (n={len(v)})" if len(v) else "–")
            t = g[g.packing_policy == p]["time_total_s"].mean()
            lines.append(f"| {p} | " + " | ".join(cells) + f" | {t:.0f} |")
        lines.append("")
        lines += ["Packs found (block names, from `packs.json`; count of runs):", ""]
        for p in ("hessian", "hessian (steps per block)", "hessian (ce)", "hessian (official)", "random"):
            sub = g[g.packing_policy == p]
            found = Counter()
            for rd in sub["run_dir"]:
                packs = json.loads((Path(rd) / "packs.json").read_text())["packs"]
                found[" | ".join(",".join(b.replace("layer", "L").replace("blocks.", "b") for b in pk) for pk in packs)] += 1
            for k, n in found.most_common(6):
                lines.append(f"- {p}: `{k}` ({n} runs)")
        lines.append("")
        rows = []
        for p in ("hessian", "hessian (ce)", "hessian (official)"):
            sc = g[g.packing_policy == p]
            per_block = {}
            for rd in sc["run_dir"]:
                s_json = json.loads((Path(rd) / "scores.json").read_text())
                for n, v in zip(s_json["names"], s_json["S"]):
                    per_block.setdefault(n, []).append(v)
            if per_block:
                names = list(per_block)
                rows.append(f"| {p} | " + " | ".join(f"{sum(v) / len(v):.3g}" for v in per_block.values()) + " |")
        if rows:
            lines += ["Hessian scores S per block (mean over the runs of each loss choice; a pack starts at each "
                      "new running minimum from the left):", "",
                      "| loss | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1), *rows, ""]
    rates = sorted({json.loads((Path(rd) / "results.json").read_text())["config"]["recon"]["w_lr"]
                    for rd in df["run_dir"]})
    lr = " ".join(f"recon.w_lr={r:g}" for r in rates)
    lines += [f"Every run above used {lr}. Regenerate (about an hour on 2 cores): "
              f"`experiments/run_granularity.sh {lr}`, which runs",
              f"`packptq experiment=ablation_granularity {lr}`, `packptq experiment=ablation_granularity_deit {lr}` "
              "and", "`python experiments/granularity_table.py multirun/ablation_granularity --out experiments/results`.", ""]
    notes = out / "granularity_notes.md"  # the hand-written reading of the table, if any
    if notes.is_file():
        lines += [notes.read_text()]
    (out / "granularity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
