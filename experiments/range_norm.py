"""Init-only (RTN) top-1 of the embedded resnet18 with every layer at the target bits, for
error norms p of the MSE range search (|q - x|^p; packptq uses the official code's 2.4).

    python experiments/range_norm.py   # the table "Initialization only" of experiments/results/range_norm.md

Runs in-process on the cached FP model (trained on first use), seed 0, 256 calibration images."""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import compose_cfg  # noqa: E402  (the Hydra composition the tests use)

import packptq.quant.quantizer as Q  # noqa: E402
from packptq import fp  # noqa: E402
from packptq.calibration import calibrate_twins  # noqa: E402
from packptq.config import typed  # noqa: E402
from packptq.data import build_datamodule  # noqa: E402
from packptq.evaluate import evaluate, predict  # noqa: E402
from packptq.quant import QuantConfig  # noqa: E402
from packptq.zoo.build import ModelConfig  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    cfg = compose_cfg(["run_dir=/tmp/range_norm", "logger=none"])
    dm = build_datamodule(cfg.data)
    mcfg = typed(ModelConfig, cfg.model, "model")
    model = fp.build(mcfg, dm)
    dm.setup()
    x, _ = dm.calib_tensors()
    split = fp.split(model, mcfg, x[:2])
    model = fp.obtain(model, dm, mcfg, cfg.cache_dir, {"accelerator": "cpu", "enable_progress_bar": False})
    cpu = torch.device("cpu")
    fp_preds, labels = predict(model, dm.test_dataloader(), cpu)
    original = Q.search_range
    print("| error norm p | W3A8 test top-1 | W3A3 test top-1 |\n|---|---|---|")
    for p in (2.0, 2.4, 3.0):
        Q.search_range = functools.partial(original, p=p)
        try:
            row = []
            for a in (8, 3):
                t = calibrate_twins(model, split.family, QuantConfig(w_bits=3, a_bits=a, first_last_bits=None), x, 0,
                                    256, cpu)
                row.append(evaluate(t.qmodel, dm.test_dataloader(), cpu, fp_preds, 10)["top1"])
        finally:
            Q.search_range = original
        print(f"| {p:g}{' (packptq)' if p == Q.RANGE_NORM else ''} | {row[0]:.2f} | {row[1]:.2f} |")


if __name__ == "__main__":
    main()
