"""Forward passes over a tensor set and the evaluation metrics: batched forwards and activation
capture (CPU results), predictions over a loader, top-1 with torchmetrics, agreement with the FP
predictions, and the per-sample KL divergence shared by block scores and sensitivities."""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy


@torch.no_grad()
def forward_all(fn: Callable, x: torch.Tensor, bs: int, device: torch.device) -> torch.Tensor:
    """fn over x [n, ...] in batches of ``bs`` on ``device``; the result [n, ...] on the CPU."""
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


def evaluate(model: nn.Module, loader, device: torch.device, fp_preds: torch.Tensor, num_classes: int) -> dict:
    """{"top1", "agreement"} of ``model`` on ``loader`` (percent)."""
    preds, labels = predict(model, loader, device)
    return {"top1": top1(preds, labels, num_classes), "agreement": agreement(preds, fp_preds)}


def print_table(r: dict) -> None:
    """The results a run prints at its end (``r``: the results.json dict)."""
    q = r["quant"]
    rows = [
        ("model / data", f"{r['model']} / {r['data']} (seed {r['seed']})"),
        ("quantization", f"W{q['w_bits']}A{q['a_bits']}, first/last {q['first_last_bits']}, acts at layer {q['act_placement']}s"),
        ("packing", f"{r['packing']['policy']} ({len(r['units'])} units, {len(r['packs'])} packs)"),
        ("FP top-1", f"{r['fp_top1']:.2f}%"),
        ("RTN top-1 (init only)", f"{r['rtn_top1']:.2f}%"),
        ("quantized top-1", f"{r['quant_top1']:.2f}%  (agreement with FP {r['agreement']:.1f}%)"),
        ("avg weight / act bits", f"{r['w_bits_avg']:.3f} / {r['a_bits_avg'] if r['a_bits_avg'] is None else round(r['a_bits_avg'], 3)}"),
        ("size", f"{r['size_bytes'] / 1024:.1f} KiB"),
    ] + [(f"time {k}", f"{v:.1f} s") for k, v in r["time_s"].items()]
    w = max(len(a) for a, _ in rows)
    print("\n".join(f"  {a.ljust(w)}  {b}" for a, b in rows))
