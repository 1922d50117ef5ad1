"""Records and tables of experiments/run_profiles.sh: profile=official beside profile=default
on the embedded resnet18, and the official switches one at a time.

    python experiments/profile_records.py SWEEP_OUT --commit HASH --out experiments/results/profiles

writes, under OUT, one compact record per run (``records/<main|ablation>/<job>/results.json``:
the results.json fields the tables use, the run's config and overrides, and the packptq commit
the sweep ran at) and ``profiles.md`` made from those records. With ``--from-records`` it reads
the committed records instead of a sweep folder (the tables again, no run needed):

    python experiments/profile_records.py --from-records --out experiments/results/profiles

``packptq-report OUT/records/main --out DIR`` reads the same records (they are results.json files).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

#: results.json keys a record keeps
KEYS = ("model", "data", "seed", "quant", "packing", "mp", "fp_top1", "rtn_top1", "quant_top1", "agreement",
        "rtn_agreement", "w_bits_avg", "a_bits_avg", "size_bytes", "packs", "bits", "recon_loss", "time_s",
        "calib_fingerprint", "calib_size", "overrides", "config")
#: the ablation's switches, in the order of docs/profiles.md, and what each sets
SWITCHES = ("packing.loss", "quant.first_last_bits", "quant.range_grid", "quant.act_init", "recon.drop_units",
            "data.calib_transform", "recon.batch_size")


def write_records(sweep: Path, out: Path, commit: str) -> None:
    for part in ("main", "ablation"):
        for res in sorted((sweep / part).glob("*/results.json")):
            r = json.loads(res.read_text())
            rec = {k: r.get(k) for k in KEYS}
            rec["packptq_commit"] = commit
            dest = out / "records" / part / res.parent.name / "results.json"
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(json.dumps(rec, indent=1, sort_keys=True) + "\n")


def load(out: Path, part: str) -> list:
    return [json.loads(p.read_text()) for p in sorted((out / "records" / part).glob("*/results.json"))]


def profile_of(rec: dict) -> str:
    ov = [o for o in rec["overrides"] if o.startswith("profile=")]
    return ov[0].split("=", 1)[1] if ov else "default"


def mean_std(values: list) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def tables(out: Path) -> str:
    main, abl = load(out, "main"), load(out, "ablation")
    iters = {r["config"]["recon"]["iters"] for r in main + abl}
    lines = ["## profile=default and profile=official (3 seeds)", "",
             f"recon.iters={'/'.join(map(str, sorted(iters)))} per unit for every run (equal steps); "
             "top-1 in % on the 1,000 test digits, mean ± sample std over seeds 0, 1, 2.", "",
             "| W/A | profile | first/last bits | init-only (RTN) top-1 | final top-1 | packs | seeds |",
             "|---|---|---|---|---|---|---|"]
    cells = {}
    for r in main:
        cells.setdefault((r["quant"]["w_bits"], r["quant"]["a_bits"], profile_of(r)), []).append(r)
    for (w, a, prof), rs in sorted(cells.items(), key=lambda kv: (-kv[0][0], -kv[0][1], kv[0][2])):
        rs = sorted(rs, key=lambda r: r["seed"])
        packs = sorted({len(r["packs"]) for r in rs})
        fl = rs[0]["quant"]["first_last_bits"]
        lines.append(f"| W{w}A{a} | {prof} | {fl if fl is not None else f'{w}/{a} (run bits)'} | "
                     f"{mean_std([r['rtn_top1'] for r in rs])} | {mean_std([r['quant_top1'] for r in rs])} | "
                     f"{'/'.join(map(str, packs))} | {','.join(str(r['seed']) for r in rs)} |")
    base = [r for r in main if profile_of(r) == "default" and (r["quant"]["w_bits"], r["quant"]["a_bits"]) == (3, 3)
            and r["seed"] == 0]
    if abl and base:
        b = base[0]
        lines += ["", "## One official switch at a time on top of profile=default (W3A3, seed 0)", "",
                  "Each row is profile=default with one switch set to the official code's value; the deltas are "
                  "against the first row. One seed: differences of a few tenths are within seed noise (compare the "
                  "spreads above).", "",
                  "| switch | value | init-only (RTN) top-1 | Δ init-only | final top-1 | Δ final | packs |",
                  "|---|---|---|---|---|---|---|",
                  f"| (none: profile=default) | | {b['rtn_top1']:.2f} | | {b['quant_top1']:.2f} | | {len(b['packs'])} |"]
        by_key = {}
        for r in abl:
            for o in r["overrides"]:
                key, _, val = o.partition("=")
                if key in SWITCHES:
                    by_key[key] = (val, r)
        for key in SWITCHES:
            if key in by_key:
                val, r = by_key[key]
                lines.append(f"| `{key}` | {val} | {r['rtn_top1']:.2f} | {r['rtn_top1'] - b['rtn_top1']:+.2f} | "
                             f"{r['quant_top1']:.2f} | {r['quant_top1'] - b['quant_top1']:+.2f} | {len(r['packs'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep", nargs="?", help="OUT folder of experiments/run_profiles.sh (main/, ablation/)")
    ap.add_argument("--out", required=True, help="results folder (records/ and profiles.md go here)")
    ap.add_argument("--commit", help="the packptq commit the sweep ran at (git rev-parse HEAD)")
    ap.add_argument("--from-records", action="store_true", help="read OUT/records instead of a sweep")
    args = ap.parse_args()
    out = Path(args.out)
    if not args.from_records:
        if not args.sweep or not args.commit:
            ap.error("give SWEEP_OUT and --commit, or --from-records")
        write_records(Path(args.sweep), out, args.commit)
    text = tables(out)
    (out / "tables.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
