"""Round trip of the pt and ONNX exports on small models at W4A4 and W2A4: each case runs the
pipeline (a small model trained on embedded data), rebuilds the run's quantized model from its
directory as ``packptq-export`` does, exports it as pt and ONNX, and compares on the whole test
set the predictions of ``load_quantized`` and of onnxruntime (CPU) with the run's quantized
model. Writes experiments/results/export.md.

    PYTHONPATH=. PACKPTQ_THREADS=1 python experiments/export_check.py [--out experiments/results/export.md]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from packptq import export, pipeline
from packptq.api import compose
from packptq.evaluate import top1

COMMON = ("logger=none", "progress=false", "threads=1", "recon.iters=100")
#: model -> overrides: small widths / depths so that every case runs in well under a minute
MODELS = {
    "resnet18": ("model=resnet18", "data=digits", "data.calib_size=128", "+model.kwargs.channels=[8,16,32,64]",
                 "model.train_epochs=4"),
    "mobilenetv2_100": ("model=mobilenetv2_100", "model.pretrained=false", "data=digits", "data.calib_size=128",
                        "model.train_epochs=4", "model.train_lr=4e-3"),
    "deit_tiny_patch16_224": ("model=deit_tiny_patch16_224", "model.patch_size=4", "+model.kwargs.depth=2",
                              "data=digits", "data.calib_size=128", "model.train_epochs=4"),
    "pointnet": ("model=pointnet", "data=shapes", "data.calib_size=128", "data.n_train=600", "data.n_test=300",
                 "data.num_points=128", "model.kwargs.width=64", "+model.kwargs.point_widths=[16,16,32,32]",
                 "model.kwargs.head_widths=[64,32]", "model.train_epochs=8"),
}
QUANT = ("w4a4", "w2a4")


@torch.no_grad()
def logits(model, x, bs=256):
    return torch.cat([model(x[i:i + bs]) for i in range(0, len(x), bs)])


def case(model: str, quant: str, root: Path) -> dict:
    run_dir = root / f"{model}_{quant}"
    over = [*COMMON, *MODELS[model], f"quant={quant}", f"run_dir={run_dir}", f"cache_dir={root / 'cache'}"]
    if not (run_dir / "results.json").is_file():
        pipeline.run(compose(over))
    results = json.loads((run_dir / "results.json").read_text())
    # what packptq-export does: the config from results.json, the run directory read back
    cfg = OmegaConf.create(results["config"])
    cfg.export = None
    qz = pipeline.quantized(cfg)
    xs, ys = zip(*qz.dm.test_dataloader())
    x, y = torch.cat(xs), torch.cat(ys)
    ncls = qz.dm.meta()["num_classes"]
    qmodel = qz.twins.qmodel.eval()
    ref = logits(qmodel, x)
    t0 = time.time()
    pt = pipeline.export_run(qz, "pt", run_dir / "quantized.pt")
    onnx = pipeline.export_run(qz, "onnx", run_dir / "quantized.onnx")
    t_export = time.time() - t0
    pt_logits = logits(export.load_quantized(run_dir / "quantized.pt"), x)
    ort_logits = export.onnx_predict(run_dir / "quantized.onnx", x)
    ort_all = export.onnx_predict(run_dir / "quantized.onnx", x, optimization="all")
    agree = lambda a: (a.argmax(1) == ref.argmax(1)).float().mean().item() * 100
    return {
        "model": model, "quant": quant.upper(), "n_test": len(x), "quant_top1": results["quant_top1"],
        "rebuilt_top1": top1(ref.argmax(1), y, ncls),
        "pt_agreement": agree(pt_logits), "pt_logits_equal": bool(torch.equal(pt_logits, ref)),
        "pt_top1": top1(pt_logits.argmax(1), y, ncls),
        "onnx_agreement": agree(ort_logits), "onnx_top1": top1(ort_logits.argmax(1), y, ncls),
        "onnx_max_abs_diff": (ort_logits - ref).abs().max().item(),
        "onnx_all_agreement": agree(ort_all), "onnx_all_top1": top1(ort_all.argmax(1), y, ncls),
        "fp_bytes": pt["fp_bytes"], "pt_bytes": pt["bytes"], "onnx_bytes": onnx["bytes"], "export_s": t_export,
    }


def table(rows) -> str:
    head = ("| model | W/A | test n | run top-1 | rebuilt top-1 | pt agree | pt logits equal | pt top-1 | "
            "ORT agree | ORT top-1 | ORT max abs logit diff | ORT-all agree | ORT-all top-1 | FP file | pt | ONNX |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        out.append(f"| {r['model']} | {r['quant']} | {r['n_test']} | {r['quant_top1']:.2f} | {r['rebuilt_top1']:.2f} | "
                   f"{r['pt_agreement']:.2f}% | {r['pt_logits_equal']} | {r['pt_top1']:.2f} | {r['onnx_agreement']:.2f}% | "
                   f"{r['onnx_top1']:.2f} | {r['onnx_max_abs_diff']:.2e} | {r['onnx_all_agreement']:.2f}% | "
                   f"{r['onnx_all_top1']:.2f} | {r['fp_bytes'] / 1024:.1f} KiB | "
                   f"{r['pt_bytes'] / 1024:.1f} KiB | {r['onnx_bytes'] / 1024:.1f} KiB |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="experiments/results/export.md")
    ap.add_argument("--root", default=None, help="directory for the runs and the FP cache (default: a temporary one)")
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    args = ap.parse_args()
    root = Path(args.root or tempfile.mkdtemp(prefix="packptq-export-check-"))
    rows = []
    for m in args.models:
        for q in QUANT:
            rows.append(case(m, q, root))
            print(json.dumps(rows[-1]), flush=True)
    text = f"""# Export round trip: pt and ONNX (QDQ) against the run's quantized model

Command: `PYTHONPATH=. PACKPTQ_THREADS=1 python experiments/export_check.py`

Each row is one pipeline run (packing=hessian, recon.iters=100, small models trained on the
embedded data: resnet18 with 8..64 channels and mobilenetv2_100 on the 16x16 digits, deit_tiny
with depth 2 and patch 4 on the digits, pointnet with width 64 on the synthetic shapes). The
run's quantized model is rebuilt from its directory (config in results.json, FP weights, unit
files) as `packptq-export` does; "rebuilt top-1" equals "run top-1" when the rebuild is
faithful. pt: `packptq.load_quantized` of the exported file; ORT: onnxruntime {__import__('onnxruntime').__version__}
(CPU, graph optimisation level basic, which runs the QDQ graph as written; ORT-all: level all, where
onnxruntime fuses DequantizeLinear -> MatMul/Conv and LayerNorm/GELU into kernels of its own
with a different float rounding) on the ONNX file (opset {export.OPSET}, QuantizeLinear/DequantizeLinear, uint8 containers clamped to the
bit range). Agreement: % of test inputs with the same top-1 class as the run's quantized model.
Sizes: the FP weights file (training cache entry, BN unfolded), the pt export (weight codes
packed in 2-, 4- or 8-bit containers; first and last layer at 8 bits), the ONNX file (weight
codes one per byte). The low top-1 of some rows comes from the few FP training epochs of these
small settings; the columns that matter here are the agreements.

{table(rows)}
"""
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "offline")
    main()
