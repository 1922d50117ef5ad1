"""Markdown table of the mixed-precision headline runs (experiments/run_mp_headline.sh):
validation choice of the learning rate, then mean ± std over seeds of test top-1 with both
bit averages of every row."""
from __future__ import annotations

import json
import statistics as st
import sys
from pathlib import Path


def load(d: Path) -> list:
    return [json.loads(p.read_text()) for p in sorted(d.glob("*/results.json"))]


def ms(xs) -> str:
    return f"{st.mean(xs):.2f} ± {st.stdev(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"


def main(out: str) -> None:
    root = Path(out)
    print("# Mixed precision at equal weight and activation averages\n")
    print("resnet18 on the embedded MNIST-5k (1,000 test digits), W3A3 target, first and last layer at "
          "8 bits, block-wise reconstruction (100 steps per unit), 256 calibration images; the "
          "validation split is 500 training samples held out of calibration.\n")
    print("Regenerate: `bash experiments/run_mp_headline.sh`\n")
    print("## Rounding learning rate, chosen on mean validation top-1 (uniform W3A3, seeds 0-2)\n")
    print("| recon.w_lr | validation top-1 (%) | test top-1 (%), not used for the choice | n |\n|---|---|---|---|")
    by_lr = {}
    for r in load(root / "choose_lr"):
        by_lr.setdefault(r["config"]["recon"]["w_lr"], []).append(r)
    for lr, rs in sorted(by_lr.items()):
        print(f"| {lr:g} | {ms([r['val_top1'] for r in rs])} | {ms([r['quant_top1'] for r in rs])} | {len(rs)} |")
    runs = load(root / "headline")
    print(f"\n## Uniform vs exact budget (recon.w_lr={runs[0]['config']['recon']['w_lr']:g}, seeds "
          f"{sorted({r['seed'] for r in runs})})\n")
    print("| allocation | avg weight bits | avg activation bits | validation top-1 (%) | test top-1 (%) | n |")
    print("|---|---|---|---|---|---|")
    for policy, acts in (("none", "follow"), ("budget", "follow"), ("budget", "fixed")):
        rs = [r for r in runs if r["mp"]["policy"] == policy and r["config"]["mp"]["acts"] == acts]
        if not rs:
            continue
        c = rs[0]["config"]["mp"]
        name = "uniform W3A3" if policy == "none" else \
            f"mp=budget, acts follow (at most {c['avg_bits']:.4f} W, {c['a_avg_bits']:.4f} A)" if acts == "follow" else \
            f"mp=budget, acts fixed at 3 bits (at most {c['avg_bits']:.4f} W)"
        print(f"| {name} | {st.mean([r['w_bits_avg'] for r in rs]):.4f} | {st.mean([r['a_bits_avg'] for r in rs]):.4f} | "
              f"{ms([r['val_top1'] for r in rs])} | {ms([r['quant_top1'] for r in rs])} | {len(rs)} |")
    print("\nBoth averages count every quantized weight and activation element, the 8-bit first and "
          "last layer included (identical over seeds); the budget rows are held to at most the uniform model's "
          "averages, both read from its results.json.")
    for r in sorted((r for r in runs if r["mp"]["policy"] == "budget"), key=lambda r: (r["config"]["mp"]["acts"], r["seed"])):
        print(f"- acts {r['config']['mp']['acts']}, seed {r['seed']}: bits per pack {r['bits']}, activation bits "
              f"{r['mp']['a_bits']}")


    notes = Path(__file__).parent / "results" / "mp_headline_notes.md"  # the hand-written reading
    if notes.is_file():
        print("\n" + notes.read_text().rstrip())


if __name__ == "__main__":
    main(sys.argv[1])
