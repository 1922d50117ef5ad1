"""The quickstart table: one row per run directory, read from its ``results.json``.

    python experiments/quickstart_table.py RUN_DIR [RUN_DIR ...] > experiments/results/quickstart.md

Columns: model, W/A bits, packing policy, iterations per unit, FP / RTN / reconstructed top-1,
agreement with the FP model, average weight and activation bits, and wall time per phase."""
from __future__ import annotations

import json
import sys
from pathlib import Path

PHASES = ("fp", "calibrate", "score", "recon", "eval")


def row(run_dir: Path) -> str:
    r = json.loads((run_dir / "results.json").read_text())
    q, t = r["quant"], r["time_s"]
    iters = r["config"]["recon"]["iters"] if r["packing"]["policy"] != "none" else "-"
    a_bits = "-" if r["a_bits_avg"] is None else f"{r['a_bits_avg']:.3f}"
    times = " / ".join(f"{t.get(p, 0.0):.0f}" for p in PHASES)
    return (f"| {r['model']} | W{q['w_bits']}A{q['a_bits']} | {r['packing']['policy']} | {iters} | "
            f"{r['fp_top1']:.2f} | {r['rtn_top1']:.2f} | {r['quant_top1']:.2f} | {r['agreement']:.1f} | "
            f"{r['w_bits_avg']:.3f} | {a_bits} | {times} | {sum(t.values()):.0f} |")


def main(argv=None) -> None:
    dirs = [Path(a) for a in (argv if argv is not None else sys.argv[1:])]
    print("| model | W/A | packing | iters/unit | FP top-1 | RTN top-1 | quantized top-1 | agreement | "
          "W bits | A bits | time fp / calibrate / score / recon / eval (s) | total (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for d in dirs:
        print(row(d))


if __name__ == "__main__":
    main()
