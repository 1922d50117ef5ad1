"""The calibration phase: the FP model becomes the quantized model (BN folded, quantized layers,
weight ranges by MSE search) and its FP twin with the same folded weights, and the activation
quantizers are initialised on the calibration set."""
from __future__ import annotations

import copy

import torch
from torch import nn

from packptq.quant import QuantConfig, calibrate, fold_bn, quantize_model
from packptq.quant.vit import copy_ln_reparam
from packptq.twins import Twins, layer_groups
from packptq.zoo import split_model


def calibrate_twins(model: nn.Module, family: str, qcfg: QuantConfig, x_cal: torch.Tensor, seed: int,
                    batch_size: int, device: torch.device, progress: bool = False) -> Twins:
    """The quantized copy of ``model`` (on ``device``, ``family`` its split rule) calibrated on
    ``x_cal`` [n, ...] in batches of ``batch_size``, with its FP reference; ``model`` itself is
    left as it was. ``seed`` fixes the activation samples the range search sees."""
    fp = copy.deepcopy(model).eval()
    fold_bn(fp)  # the reconstruction targets use the same folded weights
    qmodel = copy.deepcopy(model)
    example = x_cal[:2].to(device)
    quantize_model(qmodel, qcfg, example)
    qsplit, fsplit = split_model(qmodel, family), split_model(fp, family)
    torch.manual_seed(seed)
    calibrate(qmodel, x_cal, batch_size=batch_size, method=qcfg.a_range, progress=progress, init=qcfg.act_init,
              init_batch=qcfg.act_init_batch)
    # the LayerNorm fold of quant.ln_reparam changes the coordinates of the folded Linears'
    # inputs (block outputs are unchanged): the FP reference takes the same fold, so a layer
    # unit mixes (QDrop) and compares inputs in one coordinate system
    copy_ln_reparam(qmodel, fp)
    prefix_layers, block_layers, suffix_layers = layer_groups(qmodel, qsplit, example)
    return Twins(qmodel, fp, qsplit, fsplit, prefix_layers, block_layers, suffix_layers, device)


def run(ctx, qcfg: QuantConfig, model: nn.Module, family: str, x_cal: torch.Tensor) -> Twins:
    """The calibrate phase (``ctx``: the run's ``context.RunContext``): ``calibrate_twins`` of
    the FP ``model`` (split rule ``family``) on the calibration inputs ``x_cal`` [n, ...] with
    the run's seed, batch size and device, under the trainer's precision."""
    with ctx.phase("calibrate"):
        return calibrate_twins(model, family, qcfg, x_cal, ctx.seed, ctx.batch_size, ctx.device, ctx.progress)
