"""What a reconstruction step costs, against the unit's weight count and MACs, and how far
packptq's prediction (``packptq.recon.cost``) is from the measured time.

In one process on one thread: units of the embedded resnet18 (the quickstart: MNIST 28x28,
the trained FP model from the cache, W2A4; the first conv, every block, packs of several
blocks, the classifier) and of timm models with random weights at small sizes (resnet18,
mobilenetv2_100 at 32x32, deit_tiny at 32x32 with 8x8 patches; W4A4). Each unit is fitted with
``reconstruct_unit`` for STEPS steps from a cache built as the reconstruction sequence builds it
(``gpu_step_time.time_packs``); its time per step is the median gap between step ends. Before
the fits, ``predict_costs`` (the probe a run does at the start of reconstruction) predicts
each unit. Writes experiments/results/cost.md (tables, fits, command), cost.png (step time
against rounding variables, log-log, with the fitted power law) and cost.json (the rows).

    OMP_NUM_THREADS=1 PYTHONPATH=. python experiments/cost_table.py [--steps 30]
    python experiments/cost_table.py --run RUN_DIR --run-command CMD --out FILE.md   # one run's units
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

import lightning as L
import numpy as np
import torch

from gpu_step_time import StepClock, build_twins, step_seconds, time_packs, unit_macs
from packptq import fp
from packptq.api import compose
from packptq.calibration import calibrate_twins
from packptq.config import typed
from packptq.data import build_datamodule
from packptq.evaluate import capture
from packptq.quant import QuantConfig
from packptq.recon import cost
from packptq.recon.cost import predict_costs
from packptq.recon.sequence import Unit, channel_dim
from packptq.recon.unit import ActivationCache, ReconConfig, UnitRun, reconstruct_unit
from packptq.runtime import quiet_lightning, trainer_kwargs
from packptq.zoo.build import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def time_layer(twins, name: str, x: torch.Tensor, rcfg: ReconConfig, kw: dict, bs: int = 256) -> Dict:
    """One layer unit (``name``, a QuantLayer of the quantized model): its cache from a forward
    of each whole model over ``x``, then fitted and timed as ``time_packs`` does."""
    ql, fl = twins.pair(name)
    unit = Unit(name, "prefix", [], name, [name])
    pred = predict_costs(twins, [unit], [rcfg.iters], x, rcfg, kw)[name]
    q_in, _ = capture(twins.qmodel, x, ql, bs, CPU)
    f_in, f_out = capture(twins.fp, x, fl, bs, CPU)
    cache = ActivationCache(q_in, f_in, f_out)
    clock = StepClock(CPU)
    t0, c0 = time.perf_counter(), time.process_time()
    reconstruct_unit(ql, cache, rcfg, UnitRun(name, 0, channel_dim(ql), {**kw, "callbacks": [clock]}))
    fit_s, fit_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    return {"unit": name, "blocks": [], "n_weights": ql.layer.weight.numel(),
            "macs": unit_macs(fl, f_in[:rcfg.batch_size]), "cache_shape": list(q_in.shape), "steps": rcfg.iters,
            "step_s": step_seconds(clock.t), "fit_s": fit_s, "step_cpu_s": step_seconds(clock.cpu),
            "fit_cpu_s": fit_cpu_s, "predicted_step_s": pred.step_s,
            "predicted_fit_s": pred.seconds, "probe_fp_s": pred.fp_s, "n_tensors": 1,
            "per_weight_s": pred.per_weight_s, "per_tensor_s": pred.per_tensor_s}


def quickstart(rcfg: ReconConfig, kw: dict) -> List[Dict]:
    """Units of the embedded resnet18 as the default run builds it (FP weights from the cache)."""
    cfg = compose(["logger=none", "progress=false", "threads=1", "run_dir=unused"])
    qcfg, mcfg = typed(QuantConfig, cfg.quant, "quant"), typed(ModelConfig, cfg.model, "model")
    dm = build_datamodule(cfg.data)
    model = fp.build(mcfg, dm)
    dm.setup()
    x, _ = dm.calib_tensors()
    split = fp.split(model, mcfg, x[:2])
    model = fp.obtain(model, dm, mcfg, cfg.cache_dir, trainer_kwargs(cfg.trainer))
    twins = calibrate_twins(model, split.family, qcfg, x, int(cfg.seed), dm.cfg.batch_size, CPU)
    tag = f"resnet18 mnist5k W{qcfg.w_bits}A{qcfg.a_bits}"
    rows = []
    n = len(twins.block_names)
    for packs in ([[b] for b in range(n)], [[0], list(range(1, n))], [list(range(0, n // 2)), list(range(n // 2, n))]):
        rows += time_packs(twins, x, packs, rcfg, kw, batch_size=256)
    for name in twins.prefix_layers + twins.suffix_layers:
        rows.append(time_layer(twins, name, x, rcfg, kw))
    return [{"model": tag, **r} for r in rows]


def timm_small(name: str, rcfg: ReconConfig, kw: dict, calib: int, packs_of) -> List[Dict]:
    """Units of timm ``name`` with random weights at 32x32 (ViTs: 8x8 patches), W4A4;
    ``packs_of(n_blocks)`` lists sets of ascending, disjoint packs, each set timed in one pass."""
    vit = "deit" in name or "vit" in name
    twins, x = build_twins(name, 32, calib, CPU, QuantConfig(w_bits=4, a_bits=4), num_classes=100,
                           patch_size=8 if vit else None)
    n = len(twins.block_names)
    rows = []
    for packs in packs_of(n):
        rows += time_packs(twins, x, packs, rcfg, kw, batch_size=128)
    return [{"model": f"{name} 32x32 W4A4", **r} for r in rows]


def fit_power(xs, ys):
    """(exponent, prefactor, r^2) of ys = prefactor * xs ** exponent by least squares in logs."""
    lx, ly = np.log(xs), np.log(ys)
    k, c = np.polyfit(lx, ly, 1)
    r2 = 1 - np.sum((ly - (k * lx + c)) ** 2) / np.sum((ly - ly.mean()) ** 2)
    return float(k), float(np.exp(c)), float(r2)


def run_table(run_dir: Path, command: str) -> str:
    """Predicted against measured seconds of every unit of a finished run (its unit_XX.json)."""
    res = json.loads((run_dir / "results.json").read_text())
    rows = ["| unit | steps | rounding variables | predicted s | measured s | measured / predicted |",
            "|---|---|---|---|---|---|"]
    tp = tm = 0.0
    for f in sorted(run_dir.glob("unit_*.json")):
        u = json.loads(f.read_text())
        p, m = u.get("predicted_seconds"), u["seconds"]
        tp, tm = tp + (p or 0.0), tm + m
        rows.append(f"| {u['key']} | {len(u['loss'])} | {u.get('n_weights', '-')} | {p} | {m:.1f} | "
                    f"{m / p:.2f} |" if p else f"| {u['key']} | {len(u['loss'])} | - | - | {m:.1f} | - |")
    rows.append(f"| all | | | {tp:.1f} | {tm:.1f} | {tm / tp:.2f} |" if tp else "")
    return "\n".join([
        "# Predicted against measured reconstruction time of one run", "",
        f"Run: `{command}` (wall time, on the 2-core machine shared with other jobs); recon phase "
        f"{res['time_s'].get('recon')} s; quantized top-1 {res['quant_top1']:.2f}%. Table: "
        f"`python experiments/cost_table.py --run RUN_DIR --run-command '...'`.", "",
        *rows, ""])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30, help="reconstruction steps per unit")
    ap.add_argument("--calib", type=int, default=256, help="random calibration images of the timm models")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results" / "cost.md"))
    ap.add_argument("--run", default=None, help="instead: tabulate the predicted and measured unit times of "
                    "this finished run directory (to --out)")
    ap.add_argument("--run-command", default="packptq", help="the command that made --run (stated in the table)")
    args = ap.parse_args(argv)
    if args.run:
        text = run_table(Path(args.run), args.run_command)
        Path(args.out).write_text(text)
        print(text)
        return
    torch.set_num_threads(1)
    quiet_lightning()
    # the machine is shared: the probe and the steps are timed in this process's CPU time, which
    # leaves out the time other jobs hold the cores (on an idle core it is the wall time)
    cost.CLOCK = time.process_time
    cmd = "OMP_NUM_THREADS=1 PYTHONPATH=. python experiments/cost_table.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    print(f"[cost] {cmd}", flush=True)
    kw = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "enable_model_summary": False,
          "logger": False}
    rcfg = ReconConfig(iters=args.steps)
    t_start = time.perf_counter()
    rows = quickstart(rcfg, kw)
    rows += timm_small("resnet18", rcfg, kw, args.calib, lambda n: [[[b] for b in range(n)]])
    rows += timm_small("mobilenetv2_100", rcfg, kw, args.calib,
                       lambda n: [[[0], [n // 2], [n - 1]], [list(range(1, n - 1))]])
    rows += timm_small("deit_tiny_patch16_224", rcfg, kw, args.calib,
                       lambda n: [[[0], [n // 2, n // 2 + 1], list(range(n - 4, n))]])
    wall = time.perf_counter() - t_start

    n_w = np.array([r["n_weights"] for r in rows], float)
    macs = np.array([r["macs"] for r in rows], float)
    step = np.array([r["step_cpu_s"] for r in rows])
    step_wall = np.array([r["step_s"] for r in rows])
    pred = np.array([r["predicted_step_s"] for r in rows])
    fp_s = np.array([r["probe_fp_s"] for r in rows])
    fit_s = np.array([r["fit_cpu_s"] for r in rows])
    pred_fit = np.array([r["predicted_fit_s"] for r in rows])
    probe_w = np.array([r["per_weight_s"] * r["n_weights"] + r["per_tensor_s"] * r["n_tensors"] for r in rows])
    # step = a x FP + b x probe's rounding work + c0, least squares on relative errors
    cols = np.stack([fp_s, probe_w, np.ones_like(fp_s)], 1)
    (a, b, c0), *_ = np.linalg.lstsq(cols / step[:, None], np.ones_like(step), rcond=None)
    fit_over = statistics.median(fit_s - step * args.steps)
    k_w, p_w, r2_w = fit_power(n_w, step)
    k_m, p_m, r2_m = fit_power(macs, step)
    ratio = step / pred
    refit = cols @ np.array([a, b, c0])
    ratio_refit = step / refit

    lines = ["| model | unit | rounding variables | MACs / batch | probe FP fwd+bwd | step (CPU) | step (wall) | "
             "predicted step | measured / predicted (CPU) | whole fit: measured / predicted (CPU) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r, q, qf in zip(rows, ratio, fit_s / pred_fit):
        lines.append(f"| {r['model']} | {r['unit']} | {r['n_weights']:,} | {r['macs'] / 1e6:.1f} M | "
                     f"{r['probe_fp_s'] * 1e3:.2f} ms | {r['step_cpu_s'] * 1e3:.2f} ms | {r['step_s'] * 1e3:.2f} ms | "
                     f"{r['predicted_step_s'] * 1e3:.2f} ms | {q:.2f} | {qf:.2f} |")
    pw = statistics.median(r["per_weight_s"] for r in rows)
    pt = statistics.median(r["per_tensor_s"] for r in rows)
    err = np.abs(np.log(ratio))
    text = "\n".join([
        "# Reconstruction cost per step", "",
        f"Command: `{cmd}` ({wall / 60:.1f} min).", "",
        f"Machine: {platform.machine()}, 2 cores shared with other jobs, CPU only, 1 thread; torch {torch.__version__}, "
        f"lightning {L.__version__}, Python {platform.python_version()}. Batch {rcfg.batch_size}, {args.steps} steps "
        f"per unit; a step's time is the median gap between step ends (first 10 % left out), in this "
        f"process's CPU time (the machine is shared: wall time includes other jobs' turns; the wall-time column "
        f"shows by how much; on an idle core the two agree), and so are the probe's timings. Predicted: "
        f"`packptq.recon.cost` with the constants in the package when this ran (FP_FACTOR={cost.FP_FACTOR}, "
        f"WEIGHT_FACTOR={cost.WEIGHT_FACTOR}, STEP_OVERHEAD_S={cost.STEP_OVERHEAD_S}, FIT_OVERHEAD_S={cost.FIT_OVERHEAD_S}); the probe measured "
        f"{pw * 1e9:.2f} ns per rounding variable and {pt * 1e3:.3f} ms per weight tensor per step (medians over "
        f"its runs).", "",
        *lines, "",
        "## Fits", "",
        f"- step time against rounding variables: step = {p_w:.3g} s x n_w^{k_w:.2f} (r^2 {r2_w:.2f} in logs, "
        f"{len(rows)} units); against MACs per batch: step = {p_m:.3g} s x MACs^{k_m:.2f} (r^2 {r2_m:.2f}). "
        "Figure: `cost.png`.",
        f"- step against the probe's terms, least squares on relative errors: {a:.2f} x FP forward+backward + "
        f"{b:.2f} x the probe's rounding work (per-weight x n_w + per-tensor x n_t) + {c0 * 1e3:.2f} ms "
        "(packptq's FP_FACTOR, WEIGHT_FACTOR and STEP_OVERHEAD_S are rounded from this fit on an earlier run "
        "of this script).",
        f"- a unit's fit outside its steps (Trainer set-up, first steps, freezing): median {fit_over:.2f} s "
        "(FIT_OVERHEAD_S).",
        f"- prediction error of the step time, measured / predicted: median {np.median(ratio):.2f}, range "
        f"{ratio.min():.2f} .. {ratio.max():.2f}; median |log ratio| {np.median(err):.2f}, {np.mean(err < np.log(1.5)) * 100:.0f} % "
        f"of units within a factor 1.5. With the constants refitted on these rows: median "
        f"{np.median(ratio_refit):.2f}, range {ratio_refit.min():.2f} .. {ratio_refit.max():.2f}.",
        f"- wall / CPU time of a step while this ran: median {np.median(step_wall / step):.2f}, range "
        f"{(step_wall / step).min():.2f} .. {(step_wall / step).max():.2f} (other jobs on the machine).",
        f"- whole fit (the `seconds` a run records per unit), measured / predicted: median "
        f"{np.median(fit_s / pred_fit):.2f}, range {(fit_s / pred_fit).min():.2f} .. {(fit_s / pred_fit).max():.2f}.",
        "",
    ]) + "\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"command": cmd, "rows": rows}, indent=1) + "\n")
    plot(rows, p_w, k_w, out.with_suffix(".png"))
    print(text)


def plot(rows: List[Dict], pre: float, k: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for model in dict.fromkeys(r["model"] for r in rows):
        sub = [r for r in rows if r["model"] == model]
        ax.scatter([r["n_weights"] for r in sub], [r["step_cpu_s"] * 1e3 for r in sub], label=model, s=22)
    xs = np.logspace(np.log10(min(r["n_weights"] for r in rows)), np.log10(max(r["n_weights"] for r in rows)), 50)
    ax.plot(xs, pre * xs ** k * 1e3, "k--", lw=1, label=f"fit: {pre:.2g} s x n^{k:.2f}")
    ax.set(xscale="log", yscale="log", xlabel="rounding variables of the unit (weights)",
           ylabel="reconstruction step (ms CPU time, 1 thread)", title="Reconstruction step time per unit")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
