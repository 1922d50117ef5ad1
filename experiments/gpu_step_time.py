"""Seconds per reconstruction step per unit, on timm models with random weights.

For each model: build it with packptq's zoo (``pretrained=False``, 1,000 classes, 3 x IMG x IMG
inputs), calibrate the quantized and FP twins on CALIB random images (``calibrate_twins``), then
for a few units (the first block, a pack of two middle blocks, the last block) build the unit's
activation cache as the reconstruction sequence does (``forward_all`` over the calibration set,
``ActivationCache``) and fit it with ``reconstruct_unit`` for STEPS steps. A step's time is the
median gap between consecutive step ends (the first 10 % of steps left out), with
``torch.cuda.synchronize`` at each end on a GPU. Reports also the peak GPU memory of each fit
(``torch.cuda.max_memory_allocated``), packptq's own prediction for the unit
(``packptq.recon.cost``) and the projection to the paper's 20,000 steps per unit, as a markdown
table and as JSON.

    python experiments/gpu_step_time.py --device cuda --json OUT.json           # the GPU check
    python experiments/gpu_step_time.py --cpu-smoke                              # tiny sizes, CPU
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from typing import Dict, List, Optional, Sequence

import lightning as L
import torch
from torch.utils.flop_counter import FlopCounterMode

from packptq import fp
from packptq.calibration import calibrate_twins
from packptq.evaluate import forward_all
from packptq.quant import QuantConfig
from packptq.recon.cost import predict_costs
from packptq.recon.sequence import Chain, Unit, channel_dim
from packptq.recon.unit import ActivationCache, ReconConfig, UnitRun, reconstruct_unit
from packptq.runtime import device_of, quiet_lightning
from packptq.twins import Twins
from packptq.zoo.build import ModelConfig, build_model

PAPER_STEPS = 20000
BLOCKWISE = f"predicted_blockwise_{PAPER_STEPS}_steps_h"


class StepClock(L.Callback):
    """Wall time (``t``) and this process's CPU time (``cpu``) at the end of every step, after
    the device finished its work."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.t, self.cpu = device, [], []

    def on_train_batch_end(self, *args, **kwargs) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.t.append(time.perf_counter())
        self.cpu.append(time.process_time())


def step_seconds(t: List[float]) -> float:
    """Median gap between step ends, the first 10 % (at least one) left out: allocations, kernel
    selection and the optimizer's first step land there."""
    gaps = [b - a for a, b in zip(t, t[1:])]
    skip = max(1, len(gaps) // 10) if len(gaps) > 2 else 0
    return statistics.median(gaps[skip:]) if gaps else float("nan")


def build_twins(name: str, img: int, calib: int, device: torch.device, qcfg: QuantConfig, seed: int = 0,
                batch_size: int = 64, patch_size: Optional[int] = None, in_chans: int = 3, num_classes: int = 1000,
                kwargs: Optional[dict] = None):
    """(twins, calibration images [calib, in_chans, img, img]) of timm ``name`` with random
    weights, built, split and calibrated as a packptq run does."""
    mcfg = ModelConfig(name=name, pretrained=False, img_size=img, patch_size=patch_size, kwargs=dict(kwargs or {}))
    meta = {"num_classes": num_classes, "in_chans": in_chans, "img_size": img}
    torch.manual_seed(seed)
    model = build_model(mcfg, meta).eval()
    x = torch.randn(calib, in_chans, img, img, generator=torch.Generator().manual_seed(seed))
    split = fp.split(model, mcfg, x[:2])
    model.to(device)
    return calibrate_twins(model, split.family, qcfg, x, seed, batch_size, device), x


def default_packs(n_blocks: int, n_units: int) -> List[List[int]]:
    """The first block, a pack of two middle blocks, the last block (as many as ``n_units``)."""
    mid = max(1, n_blocks // 2 - 1)
    packs = [[0], [mid, mid + 1], [n_blocks - 1]] if n_blocks >= 4 else [[b] for b in range(n_blocks)]
    return packs[:n_units]


def unit_macs(module, x: torch.Tensor) -> int:
    """Multiply-accumulates of one forward of ``module`` on ``x`` (the whole batch)."""
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        module(x)
    return int(fc.get_total_flops() // 2)


def time_packs(twins: Twins, x: torch.Tensor, packs: Sequence[Sequence[int]], rcfg: ReconConfig, kw: dict,
               batch_size: int = 64, seed: int = 0, predict: bool = True) -> List[Dict]:
    """Fit each pack of blocks (ascending, disjoint) for ``rcfg.iters`` steps from its cache;
    one dict per pack: blocks, rounding variables, MACs of the FP pack on one batch, cache
    shape, measured s/step and fit seconds, peak GPU memory, packptq's predicted s/step."""
    dev = twins.device
    qb, fb = [b for _, b in twins.qsplit.blocks], [b for _, b in twins.fsplit.blocks]
    units = [Unit(f"pack_{j:02d}", "blocks", list(p), None, [twins.block_names[b] for b in p])
             for j, p in enumerate(packs)]
    pred = predict_costs(twins, units, [rcfg.iters] * len(units), x, rcfg, kw) if predict else {}
    q_h = forward_all(twins.qsplit.prefix, x, batch_size, dev)
    f_h = forward_all(twins.fsplit.prefix, x, batch_size, dev)
    rows, b = [], 0
    for u in units:
        while b < u.blocks[0]:  # earlier blocks stay at their calibrated (RTN) state
            q_h, f_h = forward_all(qb[b], q_h, batch_size, dev), forward_all(fb[b], f_h, batch_size, dev)
            b += 1
        chain_q, chain_f = Chain(*[qb[i] for i in u.blocks]), Chain(*[fb[i] for i in u.blocks])
        f_out = forward_all(chain_f, f_h, batch_size, dev)
        cache = ActivationCache(q_h, f_h, f_out)
        n_w = sum(m.layer.weight.numel() for m in chain_q.modules() if hasattr(m, "wq") and hasattr(m, "layer"))
        macs = unit_macs(chain_f, f_h[:rcfg.batch_size].to(dev))
        clock = StepClock(dev)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        t0, c0 = time.perf_counter(), time.process_time()
        reconstruct_unit(chain_q, cache, rcfg, UnitRun(u.key, seed, channel_dim(chain_q), {**kw, "callbacks": [clock]}))
        fit_s = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
        s = step_seconds(clock.t)
        p = pred.get(u.key)
        rows.append({"unit": "+".join(u.names), "blocks": u.blocks, "n_weights": n_w, "macs": macs,
                     "cache_shape": list(q_h.shape), "steps": rcfg.iters, "step_s": s, "fit_s": fit_s,
                     "step_cpu_s": step_seconds(clock.cpu), "fit_cpu_s": time.process_time() - c0,
                     "peak_mem_bytes": peak, "predicted_step_s": p.step_s if p else None,
                     "predicted_fit_s": p.seconds if p else None, "probe_fp_s": p.fp_s if p else None,
                     "n_tensors": p.n_tensors if p else None, "per_weight_s": p.per_weight_s if p else None,
                     "per_tensor_s": p.per_tensor_s if p else None,
                     f"projected_{PAPER_STEPS}_steps_h": s * PAPER_STEPS / 3600})
        print(f"[gpu_step_time]   {rows[-1]['unit']}: {s * 1e3:.2f} ms/step"
              + (f" (predicted {p.step_s * 1e3:.2f})" if p else ""), flush=True)
        del cache
        # past the pack: its quantized output (frozen unit) and FP output feed the next pack
        q_h, f_h = forward_all(chain_q, q_h, batch_size, dev), f_out
        b = u.blocks[-1] + 1
    return rows


def model_projection(twins: Twins, x: torch.Tensor, rcfg: ReconConfig, kw: dict) -> float:
    """packptq's predicted hours of block-wise reconstruction of the whole model (every block a
    unit) at the paper's 20,000 steps per unit."""
    n = len(twins.block_names)
    units = [Unit(f"pack_{b:02d}", "blocks", [b], None, [twins.block_names[b]]) for b in range(n)]
    costs = predict_costs(twins, units, [PAPER_STEPS] * n, x, rcfg, kw)
    return sum(c.seconds for c in costs.values()) / 3600


def table(rows: List[Dict]) -> str:
    lines = ["| model | unit | rounding variables | MACs / batch | cache (each of 3) | steps | s/step | "
             "predicted s/step | measured / predicted | peak GPU memory | 20,000 steps |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mem = f"{r['peak_mem_bytes'] / 2 ** 20:.0f} MiB" if r["peak_mem_bytes"] is not None else "-"
        pr = r["predicted_step_s"]
        pred = "-" if pr is None else f"{pr * 1e3:.2f} ms"
        ratio = "-" if pr is None else f"{r['step_s'] / pr:.2f}"
        proj = r[f"projected_{PAPER_STEPS}_steps_h"] * 60
        lines.append(f"| {r['model']} | {r['unit']} | {r['n_weights']:,} | {r['macs'] / 1e9:.2f} G | "
                     f"{r['cache_shape']} | {r['steps']} | {r['step_s'] * 1e3:.2f} ms | {pred} | {ratio} | {mem} | "
                     f"{proj:.1f} min |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet18", "deit_tiny_patch16_224"])
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--calib", type=int, default=1024, help="random calibration images")
    ap.add_argument("--steps", type=int, default=300, help="reconstruction steps per timed unit")
    ap.add_argument("--units", type=int, default=3, help="timed units per model")
    ap.add_argument("--batch-size", type=int, default=32, help="recon.batch_size")
    ap.add_argument("--device", default="cuda", help="cuda | cpu (the trainer's accelerator: gpu | cpu)")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="tiny sizes on the CPU (img 32, 32 images, 6 steps, 2 units): checks the script runs")
    ap.add_argument("--json", default=None, help="write the rows and the set-up here")
    args = ap.parse_args(argv)
    patch = None
    if args.cpu_smoke:
        args.device, args.img, args.calib, args.steps, args.units, args.batch_size = "cpu", 32, 32, 6, 2, 8
        patch = 8
    quiet_lightning()
    kw = {"accelerator": "gpu" if args.device == "cuda" else "cpu", "devices": 1, "enable_progress_bar": False,
          "enable_model_summary": False, "logger": False}
    dev = device_of(kw)
    cmd = "python experiments/gpu_step_time.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"[gpu_step_time] {cmd}", flush=True)
    rcfg = ReconConfig(iters=args.steps, batch_size=args.batch_size)
    qcfg = QuantConfig(w_bits=4, a_bits=4)
    rows, models = [], {}
    for name in args.models:
        t0 = time.perf_counter()
        twins, x = build_twins(name, args.img, args.calib, dev, qcfg,
                               patch_size=patch if "deit" in name or "vit" in name else None)
        set_up = time.perf_counter() - t0
        packs = default_packs(len(twins.block_names), args.units)
        print(f"[gpu_step_time] {name}: {len(twins.block_names)} blocks, built and calibrated in {set_up:.1f} s; "
              f"timing {[[twins.block_names[b] for b in p] for p in packs]}", flush=True)
        for r in time_packs(twins, x, packs, rcfg, kw):
            rows.append({"model": name, **r})
        models[name] = {"blocks": len(twins.block_names), "setup_s": set_up,
                        BLOCKWISE: model_projection(twins, x, rcfg, kw)}
        del twins, x
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)"
    md = "\n".join([
        f"Command: `{cmd}`", "",
        f"Device: {gpu}; torch {torch.__version__}, lightning {L.__version__}, Python {platform.python_version()}. "
        f"W{qcfg.w_bits}A{qcfg.a_bits}, random weights, {args.calib} random calibration images at "
        f"{args.img}x{args.img}, batch {args.batch_size}, {args.steps} steps per unit.", "",
        table(rows), "",
        *[f"- {m}: packptq's prediction for block-wise reconstruction of all {v['blocks']} blocks at "
          f"{PAPER_STEPS:,} steps each: {v[BLOCKWISE]:.2f} h" for m, v in models.items()],
    ])
    print(md, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": cmd, "device": gpu, "torch": torch.__version__, "img": args.img,
                       "calib": args.calib, "batch_size": args.batch_size, "steps": args.steps, "rows": rows,
                       "models": models}, f, indent=1)
        with open(args.json.rsplit(".", 1)[0] + ".md", "w") as f:
            f.write(md + "\n")


if __name__ == "__main__":
    main()
