"""Every model of the zoo through the quantization path, at small input sizes with random
weights (no network): the split composes to the forward; the model quantizes (BN folded,
attention converted, every Conv/Linear a QuantLayer) and calibrates; W8A8 stays close to FP;
the quantized model splits the same way; one pack of two blocks reconstructs for a few steps
on CPU with a finite loss and ends frozen on the grid."""
from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

import packptq.schemas  # noqa: F401  (the typed bases conf/model/*.yaml extend, as the command line has them)
from conftest import CONF
from packptq.config import typed
from packptq.recon.sequence import channel_dim as _channel_dim
from packptq.quant import (QAttention, QuantConfig, QuantLayer, QWindowAttention, WeightQuantizer, calibrate,
                           fold_bn, quantize_model)
from packptq.recon import ActivationCache, ReconConfig, UnitRun, reconstruct_unit
from packptq.zoo import check_split, split_model
from packptq.zoo.build import ModelConfig, build_model

N_CAL = 8  # calibration / reconstruction samples

# (conf/model file, model.* overrides, timm/PointNet kwargs, input shape, block count, attention
# modules). Random weights, small inputs; the transformers get small patches/windows and are cut
# in depth and width where the weight-range search would dominate the run time (the class and the
# block layout stay those of the named model).
CASES = [
    ("resnet18", {}, {}, (3, 32, 32), 8, 0),
    ("resnet50", {}, {}, (3, 32, 32), 16, 0),
    ("mobilenetv2_100", {}, {}, (3, 32, 32), 17, 0),
    ("mnasnet_100", {}, {}, (3, 32, 32), 17, 0),
    ("regnetx_006", {}, {}, (3, 32, 32), 16, 0),
    ("regnetx_032", {}, {}, (3, 32, 32), 25, 0),
    ("vit_small_patch16_224", {"patch_size": 8}, {"depth": 3}, (3, 32, 32), 3, 3),
    ("vit_base_patch16_224", {"patch_size": 8}, {"depth": 2}, (3, 32, 32), 2, 2),
    ("deit_tiny_patch16_224", {"patch_size": 8}, {"depth": 4}, (3, 32, 32), 4, 4),
    ("deit_small_patch16_224", {"patch_size": 8}, {"depth": 3}, (3, 32, 32), 3, 3),
    ("deit_base_patch16_224", {"patch_size": 8}, {"depth": 2}, (3, 32, 32), 2, 2),
    ("swin_tiny_patch4_window7_224", {}, {"window_size": 2, "embed_dim": 48}, (3, 64, 64), 12 + 3, 12),
    ("swin_small_patch4_window7_224", {}, {"window_size": 2, "embed_dim": 48}, (3, 64, 64), 24 + 3, 24),
    ("pointnet", {}, {"width": 128, "head_widths": [64, 32]}, (64, 3), 6, 0),
    ("timm", {"name": "convnext_atto", "pretrained": False}, {}, (3, 32, 32), 12 + 3, 0),
]

#: W8A8 relative output error allowed. Random-weight MobileNetV2/MNASNet amplify early weight
#: error about tenfold (8-bit per-channel weights in conv_stem alone move the logits by 2.4%),
#: so they get a looser bound than the rest (measured 0.16 and 0.09; others <= 0.05).
W8A8_TOL = {"mobilenetv2_100": 0.25, "mnasnet_100": 0.25}


def model_cfg(stem: str, override: dict, kwargs: dict) -> ModelConfig:
    """conf/model/<stem>.yaml composed by Hydra and typed, without pretrained weights."""
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(overrides=[f"+model={stem}"])
    cfg = typed(ModelConfig, OmegaConf.merge(cfg.model, {"pretrained": False, **override}), "model")
    return dataclasses.replace(cfg, kwargs=dict(kwargs))


@torch.no_grad()
def warm_bn(model: nn.Module, x: torch.Tensor) -> None:
    """One training-mode pass: BatchNorm statistics move a tenth of the way (momentum 0.1) to
    those of ``x``, so BN folding is not the identity (random weights leave mean 0 / var 1)
    yet stays well conditioned (a full step would give dead channels a variance of ~0)."""
    model.train()
    model(x)
    model.eval()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


#: cases quick enough for the fast lane (``-m "not slow"``); the others took 1.4 to 6 s each on a shared 2-core box
FAST = {"resnet18", "pointnet"}


@pytest.mark.parametrize("stem,override,kwargs,shape,n_blocks,n_attn", [
    pytest.param(*c, id=c[1].get("name", c[0]), marks=() if c[0] in FAST else pytest.mark.slow) for c in CASES])
def test_zoo_quantizes_and_reconstructs(stem, override, kwargs, shape, n_blocks, n_attn):
    torch.manual_seed(0)
    cfg = model_cfg(stem, override, kwargs)
    img = shape[-1] if len(shape) == 3 else None
    model = build_model(cfg, {"num_classes": 10, "in_chans": shape[0] if img else 3, "img_size": img})
    x = torch.randn(N_CAL, *shape)
    warm_bn(model, x)

    # the split composes to the forward
    split = split_model(model, cfg.family, example_input=x[:2])
    assert len(split.blocks) == n_blocks
    fp_out = model(x).detach()

    # quantize (BN folded, attention converted, every Conv/Linear wrapped) and calibrate
    n_layers = sum(isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)) for m in model.modules())
    fp_ref = copy.deepcopy(model)
    fold_bn(fp_ref)
    assert rel_err(fp_ref(x), fp_out) < 1e-4  # folding keeps the function
    qcfg = QuantConfig(w_bits=8, a_bits=8, w_range="minmax", a_range="minmax")  # MSE: tests/test_quant.py
    qmodel = quantize_model(copy.deepcopy(model), qcfg, x[:2])
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in qmodel.modules())
    assert sum(isinstance(m, QuantLayer) for m in qmodel.modules()) == n_layers
    assert sum(isinstance(m, (QAttention, QWindowAttention)) for m in qmodel.modules()) == n_attn
    calibrate(qmodel, x, batch_size=N_CAL, method=qcfg.a_range)
    q_out = qmodel(x).detach()
    assert torch.isfinite(q_out).all()
    err = rel_err(q_out, fp_out)
    assert err < W8A8_TOL.get(stem, 0.1), f"W8A8 relative output error {err:.3f}"

    # the quantized model and the folded FP model split like the original
    qsplit, fsplit = split_model(qmodel, split.family), split_model(fp_ref, split.family)
    assert qsplit.block_names == fsplit.block_names == split.block_names
    check_split(qmodel, qsplit, x[:2], atol=1e-4)

    # one pack (the first two blocks) reconstructs at W4 for a few steps
    span = [0, 1]
    unit = nn.Sequential(*[qsplit.blocks[b][1] for b in span])
    for m in unit.modules():
        if isinstance(m, QuantLayer):
            m.set_bits(w_bits=4)
    chain_f = nn.Sequential(*[fsplit.blocks[b][1] for b in span])
    with torch.no_grad():
        q_in, f_in = qsplit.prefix(x), fsplit.prefix(x)
        f_out = chain_f(f_in)
    cache = ActivationCache(q_in, f_in, f_out)
    rcfg = ReconConfig(iters=4, batch_size=4, log_every=1)
    losses = reconstruct_unit(unit, cache, rcfg, UnitRun("pack_00", seed=0, channel_dim=_channel_dim(unit),
                              trainer_kwargs={"accelerator": "cpu", "enable_progress_bar": False}))
    assert len(losses) == rcfg.iters and all(math.isfinite(v) for v in losses)
    wqs = [m for m in unit.modules() if isinstance(m, WeightQuantizer)]
    assert wqs and all(m.mode == "hard" and m.alpha is not None for m in wqs)
    # frozen on the grid: every dequantized weight is (k - zero_point) * scale, k an integer in 0..qmax
    qlayers = [m for m in unit.modules() if isinstance(m, QuantLayer)]
    assert qlayers and all(m.wq.bits == 4 for m in qlayers)
    for m in qlayers:
        with torch.no_grad():
            w = m.qweight()
        view = (-1,) + (1,) * (w.dim() - 1)
        k = w / m.wq.scale.view(view) + m.wq.zero_point.view(view)
        assert torch.allclose(k, k.round(), atol=1e-3), (k - k.round()).abs().max().item()
        assert k.round().min() >= 0 and k.round().max() <= m.wq.qmax == 15
        assert torch.equal(k.round(), m.wq.integer_weight(m.weight.detach()))
    assert torch.isfinite(qmodel(x)).all()
