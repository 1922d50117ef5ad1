"""Small random-weight models for the mixed-precision tests: the FP model, its BN-folded twin and
a calibrated quantized copy, with their splits."""
from __future__ import annotations

import copy

import torch

from packptq.quant import ActQuantizer, QuantConfig, QuantLayer, WeightQuantizer, calibrate, fold_bn, quantize_model
from packptq.zoo import split_model
from packptq.zoo.build import ModelConfig, build_model

#: small versions of the models, same structure: resnet18 as in conftest.TINY, a 3-block deit_tiny
SMALL = {"resnet18": {"channels": [8, 16, 32, 64]}, "deit_tiny_patch16_224": {"depth": 3}}


def tiny_quantized(name="resnet18", family="resnet", patch_size=None, n=32, w_bits=3, a_bits=3):
    """(fp model with BN folded, quantized model, their splits, inputs): random weights."""
    torch.manual_seed(0)
    kwargs = SMALL[name]
    model = build_model(ModelConfig(name=name, family=family, patch_size=patch_size, kwargs=kwargs),
                        {"num_classes": 10, "in_chans": 1, "img_size": 16}).eval()
    x = torch.randn(n, 1, 16, 16)
    fp = copy.deepcopy(model)
    fold_bn(fp)
    q = copy.deepcopy(model)
    quantize_model(q, QuantConfig(w_bits=w_bits, a_bits=a_bits), x[:2])
    calibrate(q, x, batch_size=n)
    return model, fp, q, split_model(fp, family), split_model(q, family), x


def quantizer_state(qmodel):
    """(state dict copy, [(name, bits)] of every quantizer)."""
    return ({k: v.clone() for k, v in qmodel.state_dict().items()},
            [(n, m.bits) for n, m in qmodel.named_modules() if isinstance(m, (ActQuantizer, WeightQuantizer))])


def acts_under(module):
    """Enabled activation quantizers inside ``module`` (a disabled one never quantizes)."""
    out = []
    for m in module.modules():
        if isinstance(m, QuantLayer) and not m.act_enabled:
            continue
        out += [a for a in m.children() if isinstance(a, ActQuantizer)]
    return out
