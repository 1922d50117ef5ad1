"""The eval phase and the forward passes and metrics every phase uses: batched forwards and
activation capture (CPU results), predictions over a loader, top-1 with torchmetrics, agreement
with the FP predictions, the per-sample KL divergence shared by block scores and sensitivities;
``run`` measures a model (``rtn.json`` after calibration, the final model at the end),
``results`` assembles ``results.json`` and ``table`` the lines a run ends with."""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from packptq.context import RunContext, log
from packptq.quant.quantizer import RANGE_NORM, WeightQuantizer


@torch.no_grad()
def forward_all(fn: Callable, x: torch.Tensor, bs: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """fn over x [n, ...] in batches of ``bs`` on ``device`` (default: the device of ``fn``'s
    parameters when it is a module); the result [n, ...] on the CPU."""
    if device is None:
        device = next(fn.parameters()).device
    return torch.cat([fn(x[i:i + bs].to(device)).cpu() for i in range(0, len(x), bs)])


@torch.no_grad()
def capture(fn: Callable, x: torch.Tensor, module: nn.Module, bs: int,
            device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(inputs, outputs) of ``module`` while ``fn`` runs over x [n, ...], on the CPU."""
    ins, outs = [], []

    def hook(_m, i, o):  # clone: later in-place ops (ReLU(inplace=True)) would alter them
        ins.append(i[0].detach().clone().cpu())
        outs.append(o.detach().clone().cpu())

    h = module.register_forward_hook(hook)
    try:
        for i in range(0, len(x), bs):
            fn(x[i:i + bs].to(device))
    finally:
        h.remove()
    return torch.cat(ins), torch.cat(outs)


def kl_per_sample(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(p) || softmax(q)) per sample [B] from logits [B, classes], in nats."""
    lp = F.log_softmax(p_logits, -1)
    return (lp.exp() * (lp - F.log_softmax(q_logits, -1))).sum(-1)


@torch.no_grad()
def predict(model: nn.Module, loader, device: Optional[torch.device] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(predicted classes [n], labels [n]) over a loader of (x, y) batches."""
    model.eval()
    device = device or next(model.parameters()).device
    preds, labels = [], []
    for x, y in loader:
        preds.append(model(x.to(device)).argmax(-1).cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(preds), torch.cat(labels)


def top1(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Micro top-1 accuracy in percent."""
    m = MulticlassAccuracy(num_classes=num_classes, average="micro")
    return float(m(preds, labels)) * 100.0


def agreement(preds: torch.Tensor, fp_preds: torch.Tensor) -> float:
    """Percent of samples where the quantized model predicts what the FP model predicts."""
    return float((preds == fp_preds).float().mean()) * 100.0


def evaluate(model: nn.Module, loader, device: torch.device, fp_preds: torch.Tensor, num_classes: int,
             val_loader=None) -> dict:
    """{"top1", "agreement", "val_top1"} of ``model`` (percent): top-1 and agreement with the FP
    predictions on ``loader`` (the test split), top-1 on ``val_loader`` (None without one)."""
    preds, labels = predict(model, loader, device)
    return {"top1": top1(preds, labels, num_classes), "agreement": agreement(preds, fp_preds),
            "val_top1": None if val_loader is None else top1(*predict(model, val_loader, device), num_classes)}


@dataclass
class EvalSet:
    """The data a run is measured on: the datamodule ``dm`` (its test split) and the loader of
    its validation split (None without ``data.val_size``)."""

    dm: object
    val: object = None

    def test(self):
        return self.dm.test_dataloader()

    @property
    def num_classes(self) -> int:
        return self.dm.meta()["num_classes"]


@dataclass(frozen=True)
class Metrics:
    """Top-1 on the test split, agreement with the FP predictions and top-1 on the validation
    split (None without one), in percent."""

    top1: float
    agreement: float
    val_top1: Optional[float] = None


def run(ctx: RunContext, model: nn.Module, data: EvalSet, fp_preds: torch.Tensor, artifact: Optional[str] = None,
        phase: Optional[str] = None, what: Optional[str] = None) -> Metrics:
    """Measure ``model`` on ``data`` against the FP predictions ``fp_preds`` [n_test] under the
    trainer's precision, timed as ``phase`` when given; with ``artifact`` (e.g. ``rtn.json``)
    the numbers are written to the run directory once and read back on resume; ``what`` names
    the model in a log line of its top-1."""

    def measure() -> dict:
        with ctx.autocast():
            return evaluate(model, data.test(), ctx.device, fp_preds, data.num_classes, data.val)

    with ctx.timer.phase(phase) if phase else nullcontext():
        m = ctx.rd.cached_json(artifact, measure) if artifact else measure()
    if what:
        log.info("%s top-1 %.2f%%", what, m["top1"])
    return Metrics(m["top1"], m["agreement"], m.get("val_top1"))


@contextmanager
def soft_rounding(model: nn.Module):
    """Inside the block, every reconstructed weight quantizer of ``model`` rounds softly
    (floor(w/s) + h(V), AdaRound's training form): weights off the quantization grid, so what is
    measured is not a quantized model. Yields how many quantizers it switched."""
    switched = [m for m in model.modules() if isinstance(m, WeightQuantizer) and m.alpha is not None
                and m.mode == "hard"]
    for m in switched:
        m.mode = "soft"
    try:
        yield len(switched)
    finally:
        for m in switched:
            m.mode = "hard"


def offgrid(ctx: RunContext, model: nn.Module, data: EvalSet, fp_preds: torch.Tensor) -> dict:
    """The ``recon.eval_rounding=soft`` diagnostic: top-1 with soft rounding kept (the official
    Pack-PTQ code's evaluation), as results.json's ``offgrid`` entry; never the run's top-1."""
    with soft_rounding(model) as n:
        m = run(ctx, model, data, fp_preds, phase="eval")
    log.info("off-grid diagnostic (soft rounding in %d weight quantizers, not a quantized model): top-1 %.2f%%",
             n, m.top1)
    return {"top1": m.top1, "agreement": m.agreement, "val_top1": m.val_top1, "soft_quantizers": n,
            "note": "recon.eval_rounding=soft: weights off the quantization grid; quant_top1 is the quantized model"}


def results(ctx: RunContext, settings, fp, rtn: Metrics, ptq, final: Metrics, overrides, seed: int,
            code: Optional[dict] = None) -> dict:
    """The results.json dict of a run: ``settings`` (``settings.Settings``), ``fp`` (the fp
    phase's ``fp.FPResult``), ``rtn`` and ``final`` (the model after calibration and at the
    end), ``ptq`` (``pipeline.PTQResult``: scores, packs, bits, units and losses), ``code``
    (``artifacts.code_version()`` when the run started)."""
    q, p, names, dm = settings.quant, settings.packing, ptq.twins.block_names, fp.data.dm
    sc, acct = ptq.scores, ptq.bits.acct
    return {
        "model": settings.model.name, "data": dm.cfg.name, "seed": int(seed),
        "quant": {k: getattr(q, k) for k in ("w_bits", "a_bits", "first_last_bits", "act_placement", "w_range",
                                              "a_range", "attn_prob", "quant_attn", "ln_reparam")}
                 | {"range_norm": RANGE_NORM},
        "packing": {"policy": p.policy, "loss": p.loss},
        "mp": settings.mp.describe() if settings.mp is not None else {"policy": "none"},
        "fp_top1": fp.top1, "rtn_top1": rtn.top1, "quant_top1": final.top1, "agreement": final.agreement,
        "rtn_agreement": rtn.agreement,
        "val_size": dm.cfg.val_size, "fp_val_top1": fp.val_top1, "rtn_val_top1": rtn.val_top1,
        "val_top1": final.val_top1,
        **acct,
        "units": [u.names for u in ptq.recon.units], "unit_keys": [u.key for u in ptq.recon.units],
        "packs": [[names[i] for i in pk] for pk in ptq.packs], "bits": ptq.bits.pack_bits,
        "scores": sc.S if sc else None, "omega": sc.omega if sc else None,
        "recon_loss": first_last(ptq.recon.losses),
        "time_s": ctx.times, "fingerprint": ctx.rd.run_fp,
        "calib_fingerprint": dm.fingerprint(), "calib_size": len(fp.x_cal),
        "overrides": list(overrides or []), "config": ctx.config, "run_dir": str(ctx.rd.path),
        "packptq": code,
    }


def report(ctx: RunContext, r: dict) -> None:
    """The end of a run: its metrics to the metrics logger, its table to the log (``r``: the
    results.json dict)."""
    ctx.log_metrics({"eval/quant_top1": r["quant_top1"], "eval/rtn_top1": r["rtn_top1"], "eval/val_top1": r["val_top1"],
                     "eval/agreement": r["agreement"], "eval/w_bits_avg": r["w_bits_avg"],
                     "eval/a_bits_avg": r["a_bits_avg"] or 0.0, "eval/size_bytes": r["size_bytes"],
                     **{f"time/{k}_s": v for k, v in ctx.timer.times.items()},
                     **{f"recon_loss/{k}": v[-1] for k, v in r["recon_loss"].items()}})
    log.info("\n".join(["results:", *table(r)]))


def first_last(losses: dict) -> dict:
    """{unit: [first, last]} of per-step reconstruction losses (units that trained)."""
    return {k: [v[0], v[-1]] for k, v in losses.items() if v}


def table(r: dict) -> List[str]:
    """The lines a run ends with (``r``: the results.json dict)."""
    q = r["quant"]
    rows = [
        ("model / data", f"{r['model']} / {r['data']} (seed {r['seed']})"),
        ("quantization", f"W{q['w_bits']}A{q['a_bits']}, first/last {q['first_last_bits']}, acts at layer {q['act_placement']}s"),
        ("packing", f"{r['packing']['policy']} ({len(r['units'])} units, {len(r['packs'])} packs)"),
        ("FP top-1", f"{r['fp_top1']:.2f}%"),
        ("RTN top-1 (init only)", f"{r['rtn_top1']:.2f}%"),
        ("quantized top-1", f"{r['quant_top1']:.2f}%  (agreement with FP {r['agreement']:.1f}%)"),
    ] + ([("off-grid top-1", f"{r['offgrid']['top1']:.2f}%  (diagnostic: soft rounding, not a quantized model)")]
         if r.get("offgrid") else []) + ([("validation top-1", f"FP {r['fp_val_top1']:.2f}%, RTN {r['rtn_val_top1']:.2f}%, quantized "
                               f"{r['val_top1']:.2f}% ({r['val_size']} training samples)")]
         if r.get("val_top1") is not None else []) + [
        ("avg weight / act bits", f"{r['w_bits_avg']:.3f} / {r['a_bits_avg'] if r['a_bits_avg'] is None else round(r['a_bits_avg'], 3)}"),
        ("size", f"{r['size_bytes'] / 1024:.1f} KiB"),
    ] + [(f"time {k}", f"{v:.1f} s") for k, v in r["time_s"].items()]
    w = max(len(a) for a, _ in rows)
    return [f"  {a.ljust(w)}  {b}" for a, b in rows]
