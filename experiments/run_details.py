"""Per-run detail tables for a handful of run directories (read from each ``results.json``):
top-1 per run with the mean ± std, the block importance scores S_b, and each unit's
reconstruction loss at its first and last step.

    python experiments/run_details.py RUN_DIR [RUN_DIR ...] > details.md

The grouped mean ± std over many runs is ``packptq-report``'s job; this prints what a results
file like experiments/results/pointnet.md shows run by run."""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def _load(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def _packs(r: dict) -> str:
    return " / ".join("+".join(p) for p in r.get("packs") or []) or "-"


def _mean_std(xs) -> str:
    return f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs):.1f}" if len(xs) > 1 else f"{xs[0]:.1f}"


def top1_table(runs: list[dict]) -> str:
    out = ["| seed | FP top-1 | RTN top-1 | quantized top-1 | agreement with FP | W bits (avg) | A bits (avg) "
           "| size (KiB) | packs |", "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        a_bits = "-" if r["a_bits_avg"] is None else f"{r['a_bits_avg']:.3f}"
        out.append(f"| {r['seed']} | {r['fp_top1']:.1f} | {r['rtn_top1']:.1f} | {r['quant_top1']:.1f} | "
                   f"{r['agreement']:.1f} | {r['w_bits_avg']:.3f} | {a_bits} | {r['size_bytes'] / 1024:.1f} | "
                   f"{_packs(r)} |")
    if len(runs) > 1:
        cols = [_mean_std([r[k] for r in runs]) for k in ("fp_top1", "rtn_top1", "quant_top1", "agreement")]
        out.append(f"| mean ± std ({len(runs)}) | " + " | ".join(cols) + " | | | | |")
    return "\n".join(out)


def scores_table(runs: list[dict], blocks: list[str]) -> str:
    scored = [r for r in runs if r.get("scores")]
    if not scored:
        return "(no block scores: the packing policy does not compute them)"
    out = ["| block | " + " | ".join(f"S (seed {r['seed']})" for r in scored) + " |",
           "|---|" + "---|" * len(scored)]
    for i, b in enumerate(blocks):
        out.append(f"| {b} | " + " | ".join(f"{r['scores'][i]:.2e}" for r in scored) + " |")
    return "\n".join(out)


def loss_table(runs: list[dict]) -> str:
    out = ["| seed | unit | modules | loss, first step | loss, last step |", "|---|---|---|---|---|"]
    for r in runs:
        for (unit, (first, last)), modules in zip(r.get("recon_loss", {}).items(), r["units"]):
            out.append(f"| {r['seed']} | {unit} | {', '.join(modules)} | {first:.4g} | {last:.4g} |")
    return "\n".join(out)


def main(argv=None) -> None:
    runs = [_load(Path(a)) for a in (argv if argv is not None else sys.argv[1:])]
    blocks = [b for pack in runs[0].get("packs") or [] for b in pack]
    print("## Top-1 (%)\n")
    print(top1_table(runs))
    print("\n## Block importance S_b (the packing loss)\n")
    print(scores_table(runs, blocks))
    print("\n## Reconstruction loss per unit (squared error summed over channels)\n")
    print(loss_table(runs))
    t = runs[0]["time_s"]
    print(f"\nTime for seed {runs[0]['seed']} (s): " + ", ".join(f"{k} {v:.0f}" for k, v in t.items()) + ".")


if __name__ == "__main__":
    main()
