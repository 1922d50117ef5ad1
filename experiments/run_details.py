"""Per-run detail tables for a handful of run directories (read from each ``results.json``):
top-1 per run with the mean ± std, the block importance scores S_b, and each unit's
reconstruction loss at its first and last step.

    python experiments/run_details.py RUN_DIR [RUN_DIR ...] > details.md
    python experiments/run_details.py --group "block-wise=DIR,DIR,DIR" --group "hessian=DIR,DIR,DIR"

The grouped mean ± std over many runs is ``packptq-report``'s job; this prints what a results
file like experiments/results/pointnet.md shows run by run."""
from __future__ import annotations

import argparse
import json
import statistics
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


def compare_table(groups: list[tuple[str, list[dict]]]) -> str:
    """One row per group of runs (the same setting over seeds): mean ± std and each run's top-1."""
    out = ["| setting | overrides | seeds | RTN top-1 | top-1 | RTN agreement with FP | agreement with FP | top-1 per seed "
           "| packs per seed | steps per seed | recon time (s, mean) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, runs in groups:
        per = lambda k, f="{:.1f}": " / ".join(f.format(r[k]) for r in runs)
        steps = " / ".join(str(total_steps(r)) for r in runs)
        over = " ".join(o for o in runs[0]["overrides"] if not o.startswith(("seed=", "hydra.", "logger=", "threads=", "progress=")))
        out.append(f"| {label} | `{over}` | {per('seed', '{}')} | {_mean_std([r['rtn_top1'] for r in runs])} | "
                   f"{_mean_std([r['quant_top1'] for r in runs])} | {_mean_std([r['rtn_agreement'] for r in runs])} | "
                   f"{_mean_std([r['agreement'] for r in runs])} | "
                   f"{per('quant_top1')} | {' / '.join(str(len(r.get('packs') or [])) for r in runs)} | {steps} | "
                   f"{statistics.mean(r['time_s'].get('recon', 0.0) for r in runs):.0f} |")
    return "\n".join(out)


def total_steps(r: dict) -> int:
    """Reconstruction steps of a run over all its units (``recon.iters`` per unit, or per block
    of a pack with ``recon.iters_per=block``)."""
    rc, units = r["config"]["recon"], r["units"]
    packs = (r.get("packs") or []) if r["packing"]["policy"] != "layer" else []
    per_block = rc.get("iters_per", "unit") == "block"
    return rc["iters"] * (len(units) - len(packs) + sum(len(p) if per_block else 1 for p in packs))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="*", help="run directories: per-run tables")
    ap.add_argument("--group", action="append", default=[], metavar="LABEL=DIR,DIR,...",
                    help="a setting over seeds: one row of the comparison table")
    args = ap.parse_args(argv)
    if args.group:
        groups = [(g.split("=", 1)[0], [_load(Path(d)) for d in g.split("=", 1)[1].split(",")]) for g in args.group]
        print(compare_table(groups))
    if not args.runs:
        return
    runs = [_load(Path(a)) for a in args.runs]
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
