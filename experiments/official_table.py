"""experiments/results/official.md: the official code's block score beside the kl score on the
embedded resnet18 (scores, packs, top-1 over seeds), and the official bit rule on it.

    python experiments/official_table.py SCORE_SWEEP_DIR MP_RUN_DIR > experiments/results/official.md
"""
from __future__ import annotations

import json
import statistics as st
import sys
from collections import Counter
from pathlib import Path


def main(sweep: str, mp_run: str) -> None:
    runs = [json.loads(p.read_text()) for p in sorted(Path(sweep).glob("*/results.json"))]
    print("# The official Pack-PTQ block score and bit rule on the embedded resnet18\n")
    lrs = sorted({r["config"]["recon"]["w_lr"] for r in runs})
    print("resnet18 on the embedded MNIST-5k (FP top-1 98.00%), 256 calibration images, first/last layer "
          f"at 8 bits, Hessian packing, 100 reconstruction steps per unit at rounding lr "
          f"{', '.join(f'{lr:g}' for lr in lrs)} (the preset's rate, chosen on the validation split: "
          "mp_headline.md), seeds 0-2.\n")
    print("Regenerate:\n```\npackptq experiment=ablation_granularity packing=hessian packing.loss=official,kl "
          "quant=w3a3,w2a4 seed=0,1,2 hydra.sweep.dir=multirun/official_score/resnet18\n"
          "packptq mp=official packing.loss=official quant=w3a3 recon.iters=0 logger=csv "
          "hydra.run.dir=outputs/mp_official_w3a3\n"
          "python experiments/official_table.py multirun/official_score/resnet18 outputs/mp_official_w3a3\n```\n")
    for q in ("w3a3", "w2a4"):
        print(f"## {q.upper()}\n")
        print("| score | top-1 (mean ± std) | RTN top-1 | packs (count of runs) |\n|---|---|---|---|")
        for loss in ("kl", "official"):
            rs = [r for r in runs if r["packing"]["loss"] == loss and f"w{r['quant']['w_bits']}a{r['quant']['a_bits']}" == q]
            if not rs:
                continue
            t = [r["quant_top1"] for r in rs]
            packs = Counter(" | ".join(",".join(b.replace("layer", "L") for b in p) for p in r["packs"]) for r in rs)
            print(f"| {loss} | {st.mean(t):.2f} ± {st.stdev(t):.2f} (n={len(t)}) | "
                  f"{st.mean(r['rtn_top1'] for r in rs):.2f} | "
                  + "; ".join(f"`{k}` ({v})" for k, v in packs.items()) + " |")
        print()
        names = None
        print("Block scores S_b, seed 0:\n")
        for loss in ("kl", "official"):
            r = next((r for r in runs if r["packing"]["loss"] == loss and r["seed"] == 0
                      and f"w{r['quant']['w_bits']}a{r['quant']['a_bits']}" == q), None)
            if r is None:
                continue
            if names is None:
                names = [b for p in r["packs"] for b in p]
                print("| score | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
            print(f"| {loss} | " + " | ".join(f"{s:.3g}" for s in r["scores"]) + " |")
        print()
    mp = json.loads((Path(mp_run) / "results.json").read_text())
    bits = json.loads((Path(mp_run) / "bits.json").read_text())
    m = mp["mp"]
    print("## mp=official at a W3A3 target (rule points as in docs/decisions.md)\n")
    print(f"- 1. candidates (mid, high) = {m['candidates']}; 2. prefix/suffix at {m['prefix_bits']}/{m['suffix_bits']} "
          "bits (weights and activations)")
    print(f"- 3. pack scores: mean official omega per pack: "
          + ", ".join(f"{sum(mp['omega'][i] for i in idx) / len(idx):.3g}" for idx in _idx(mp)))
    print(f"- 4./5. budget (mid + high) / 2 = {m['avg_bits']} bits per stored element (weights + per-sample "
          f"activations); per-pack bits {m['bits']} (activations {m['a_bits']})")
    print(f"- achieved: weight average {mp['w_bits_avg']:.4f} bits, activation average {mp['a_bits_avg']:.4f} bits; "
          f"RTN top-1 {mp['rtn_top1']:.2f}% (no reconstruction in this run)")
    print(f"- packs: {mp['packs']}")
    _ = bits


def _idx(r):
    flat = [b for p in r["packs"] for b in p]
    return [[flat.index(b) for b in p] for p in r["packs"]]


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
