"""Quantizers, quantized modules and model conversion: error bounds and grids, the MSE range
search, the log-sqrt(2) grid, exact BN folding, transparency with quantizers off (resnet and
deit, where QAttention must equal timm's Attention), first/last layer handling, AdaRound's
frozen weights on the grid, and activation placement."""
from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
from torch import nn

from packptq.config import ConfigError
from packptq.quant import (ActQuantizer, LogSqrt2Quantizer, QAttention, QuantConfig, QuantLayer,
                           UniformQuantizer, WeightQuantizer, calibrate, fold_bn, freeze, quant_layers,
                           quantize_model, search_range, set_quant_state)
from packptq.quant.quantizer import fake_quant


def resnet(seed: int = 0, width: int = 8) -> nn.Module:
    """timm resnet18 (all 8 blocks, 20 BNs); ``width`` 8 shrinks the channels 8x (fast MSE
    weight-range search), 64 is the real one."""
    torch.manual_seed(seed)
    return timm.create_model("resnet18", num_classes=10, in_chans=1,
                             channels=[width, 2 * width, 4 * width, 8 * width]).eval()


def deit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("deit_tiny_patch16_224", num_classes=10, in_chans=1, img_size=16,
                             patch_size=8, depth=2).eval()


def randomize_bn(model: nn.Module, seed: int = 1) -> nn.Module:
    """Non-trivial BN statistics and affine parameters (a fresh BN folds to the identity)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
            m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=g))
            m.weight.data.copy_(0.5 + torch.rand(c, generator=g))
            m.bias.data.copy_(0.4 * torch.rand(c, generator=g) - 0.2)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def clip_range(s: torch.Tensor, z: torch.Tensor, qmax: int):
    return (0 - z) * s, (qmax - z) * s


# ---------------------------------------------------------------------------------------------
# uniform quantizer
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["minmax", "mse"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_uniform_error_bound_and_grid_per_channel(method, bits):
    g = torch.Generator().manual_seed(bits)
    # channels of very different scale and offset, so per-channel ranges matter
    x = torch.randn(6, 5, 3, 3, generator=g) * torch.logspace(-2, 1, 6)[:, None, None, None] \
        + torch.linspace(-1, 2, 6)[:, None, None, None]
    s, z = search_range(x, bits, ch_axis=0, method=method)
    assert s.shape == (6,) and z.shape == (6,)
    qmax = 2 ** bits - 1
    assert torch.all(z == z.round()) and torch.all((z >= 0) & (z <= qmax))
    sv, zv = s.view(-1, 1, 1, 1), z.view(-1, 1, 1, 1)
    xq = fake_quant(x, sv, zv, qmax)
    # on the grid: (xq / s + zp) is an integer in [0, qmax]
    k = xq / sv + zv
    assert torch.allclose(k, k.round(), atol=1e-4)
    assert k.round().min() >= 0 and k.round().max() <= qmax
    # error at most half a step inside the clipping range, per channel
    lo, hi = clip_range(sv, zv, qmax)
    inside = (x >= lo) & (x <= hi)
    assert inside.float().mean() > 0.5
    err = (xq - x).abs()
    assert torch.all(err[inside] <= (sv / 2).expand_as(x)[inside] * (1 + 1e-5) + 1e-7)
    # outside it, values clip to the nearest end of the range
    assert torch.allclose(xq[x > hi], hi.expand_as(x)[x > hi], atol=1e-5)
    if method == "minmax":  # min-max: within half a step everywhere (the rounded zero point
        # may shift the grid by up to half a step, so extremes can clip by at most that)
        assert torch.all(err <= (sv / 2).expand_as(x) * (1 + 1e-5) + 1e-7)


def test_uniform_quantizer_module_per_tensor_and_passthrough():
    x = torch.randn(1000) * 3 + 1
    q = UniformQuantizer(4, None)
    assert torch.equal(q(x), x)  # not initialised yet: identity
    q.init_from(x, "minmax")
    xq = q(x)
    assert xq.unique().numel() <= 16
    assert (xq - x).abs().max() <= q.scale.abs() / 2 * (1 + 1e-5)
    q.enabled = False
    assert torch.equal(q(x), x)


def test_mse_range_beats_minmax_with_outliers():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4096, generator=g)
    x[:, 0] = torch.tensor([12.0, -10.0, 9.0, 15.0])  # one outlier per channel
    for bits in (3, 4):
        errs = {}
        for method in ("minmax", "mse"):
            s, z = search_range(x, bits, ch_axis=0, method=method)
            xq = fake_quant(x, s[:, None], z[:, None], 2 ** bits - 1)
            errs[method] = (xq - x).pow(2).mean(dim=1)
        assert torch.all(errs["mse"] < errs["minmax"]), (bits, errs)
        assert errs["mse"].mean() < 0.5 * errs["minmax"].mean()


def test_mse_search_never_worse_than_minmax():
    # r = 1 (min-max) is in the search grid, so the chosen range can only be better or equal in
    # the norm the search minimises (|error|^RANGE_NORM)
    from packptq.quant.quantizer import RANGE_NORM

    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        x = torch.randn(8, 300, generator=g).pow(3)
        for bits in (2, 4, 6):
            e = {}
            for method in ("minmax", "mse"):
                s, z = search_range(x, bits, 0, method)
                e[method] = (fake_quant(x, s[:, None], z[:, None], 2 ** bits - 1) - x).abs().pow(RANGE_NORM).mean(1)
            assert torch.all(e["mse"] <= e["minmax"] + 1e-7)


def test_unknown_range_method_raises():
    with pytest.raises(ValueError, match="known: minmax, mse"):
        search_range(torch.randn(10), 4, None, "percentile")


# ---------------------------------------------------------------------------------------------
# log-sqrt(2) quantizer
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [3, 4])
def test_logsqrt2_levels_are_powers_of_sqrt2_times_scale(bits):
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(64, 4, 17, 17) * 3, dim=-1)
    q = LogSqrt2Quantizer(bits)
    q.init_from(probs)
    scale = float(q.scale)
    assert 0.5 * float(probs.max()) - 1e-6 <= scale <= float(probs.max()) + 1e-6
    # values above the scale included: they must saturate, not get levels of their own
    x = torch.cat([probs.reshape(-1), torch.tensor([1.0, 0.999, scale * 1.3, 0.0])])
    out = q(x)
    nz = out[out != 0]
    k = -2 * torch.log2(nz / scale)
    assert torch.allclose(k, k.round(), atol=1e-4), "outputs must be scale * sqrt(2)^-k"
    k = k.round()
    assert k.min() >= 0 and k.max() <= 2 ** bits - 2
    assert out.unique().numel() <= 2 ** bits  # a b-bit quantizer: at most 2^b values
    assert out.max() <= scale * (1 + 1e-6)
    # each value goes to its nearest level in the log domain (ties aside): relative error bound
    inside = (x > scale * 2 ** (-(2 ** bits - 2) / 2)) & (x <= scale)
    assert torch.all((out[inside] / x[inside]).log2().abs() <= 0.25 + 1e-4)


def test_logsqrt2_mse_init_beats_the_worst_scale():
    torch.manual_seed(1)
    p = torch.softmax(torch.randn(32, 16, 16) * 2, -1).reshape(-1)
    q = LogSqrt2Quantizer(4)
    q.init_from(p)
    best = (q._q(p, q.scale) - p).pow(2).mean()
    for r in (0.5, 0.75, 1.0):
        assert best <= (q._q(p, p.max() * r) - p).pow(2).mean() + 1e-12


# ---------------------------------------------------------------------------------------------
# BN folding and transparency
# ---------------------------------------------------------------------------------------------
def test_fold_bn_is_exact_on_resnet18():
    model = randomize_bn(resnet(width=64))
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        ref = model(x)
        folded = copy.deepcopy(model)
        n = fold_bn(folded)
        out = folded(x)
    assert n == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 20
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert rel_err(out, ref) < 1e-5
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_fold_bn_does_not_fold_across_a_nonlinearity():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4),   # not foldable
                        nn.Conv2d(4, 4, 1), nn.Dropout(0.1), nn.BatchNorm2d(4))  # foldable
    randomize_bn(seq)
    seq.eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = seq(x)
        assert fold_bn(seq) == 1
        assert isinstance(seq[2], nn.BatchNorm2d) and not isinstance(seq[5], nn.BatchNorm2d)
        assert torch.allclose(seq(x), ref, atol=1e-5)


@pytest.mark.parametrize("build,shape", [(resnet, (4, 1, 16, 16)), (deit, (4, 1, 16, 16))],
                         ids=["resnet18", "deit"])
def test_all_quantizers_off_reproduces_fp(build, shape):
    model = build()
    if build is resnet:
        randomize_bn(model)
    x = torch.randn(*shape)
    with torch.no_grad():
        ref = model(x)
        q = quantize_model(copy.deepcopy(model), QuantConfig(w_bits=3, a_bits=3), x[:2])
        calibrate(q, x)
        assert rel_err(q(x), ref) > 1e-3  # quantization does something ...
        set_quant_state(q, False, False)
        out = q(x)  # ... and nothing once every quantizer is off
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    if build is deit:
        assert sum(isinstance(m, QAttention) for m in q.modules()) == 2


def test_qattention_equals_timm_attention():
    model = deit()
    attn = model.blocks[0].attn
    x = torch.randn(3, 5, attn.qkv.in_features)
    with torch.no_grad():
        ref = attn(x)
        qa = QAttention(copy.deepcopy(attn), a_bits=4)
        assert torch.allclose(qa(x), ref, atol=1e-6)  # quantizers not calibrated: transparent
        for m in qa.act_quantizers():
            m.init_from(torch.randn(1000))
        assert not torch.allclose(qa(x), ref, atol=1e-3)
        set_quant_state(qa, False, False)
        assert torch.allclose(qa(x), ref, atol=1e-6)


@pytest.mark.parametrize("build,shape", [(resnet, (8, 1, 16, 16)), (deit, (8, 1, 16, 16))],
                         ids=["resnet18", "deit"])
def test_w8a8_is_close_to_fp_and_w2a4_is_not(build, shape):
    model = build()
    x = torch.randn(*shape)
    errs = {}
    for w, a in ((8, 8), (2, 4)):
        q = quantize_model(copy.deepcopy(model), QuantConfig(w_bits=w, a_bits=a, first_last_bits=None), x[:2])
        calibrate(q, x)
        with torch.no_grad():
            errs[w] = rel_err(q(x), model(x))
    assert errs[8] < 0.05, errs
    assert errs[2] > 4 * errs[8], errs


# ---------------------------------------------------------------------------------------------
# first / last layers, placement
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("build,shape,first,last", [
    (resnet, (2, 1, 16, 16), "conv1", "fc"),
    (deit, (2, 1, 16, 16), "patch_embed.proj", "head"),
], ids=["resnet18", "deit"])
def test_first_layer_input_not_quantized_and_first_last_bits(build, shape, first, last):
    x = torch.randn(*shape)
    q = quantize_model(build(), QuantConfig(w_bits=3, a_bits=4, first_last_bits=8), x)
    assert q.packptq_first_last == (first, last)
    layers = dict(quant_layers(q))
    assert layers[first].act_enabled is False
    assert all(m.act_enabled for n, m in layers.items() if n != first)
    for n, m in layers.items():
        want = 8 if n in (first, last) else 3
        assert m.wq.bits == want, n
        assert m.aq.bits == (8 if n in (first, last) else 4), n
    # the first layer sees the raw image: its (disabled) input quantizer is never calibrated
    calibrate(q, torch.randn(8, *shape[1:]))
    assert not bool(layers[first].aq.q.initialized)
    assert bool(layers[last].aq.q.initialized)
    # first_last_bits null: every layer at the target bits
    q2 = quantize_model(build(), QuantConfig(w_bits=3, a_bits=4, first_last_bits=None), x)
    assert {m.wq.bits for _, m in quant_layers(q2)} == {3}


def test_act_placement_output_puts_quantizers_on_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).eval()
    x = torch.randn(16, 1, 8, 8)
    q = quantize_model(copy.deepcopy(model), QuantConfig(w_bits=8, a_bits=3, first_last_bits=None,
                                                         act_placement="output"), x[:2])
    calibrate(q, x)
    layers = dict(quant_layers(q))
    assert all(m.placement == "output" for m in layers.values())
    first, mid, last = layers["0"], layers["2"], layers["5"]
    assert first.act_enabled and mid.act_enabled and not last.act_enabled  # logits stay FP
    with torch.no_grad():
        h = x
        y0 = first(h)
        # the output of the first layer lies on its activation grid: a 3-bit quantizer
        assert y0.unique().numel() <= 8
        s, z = first.aq.q.scale.abs(), first.aq.q.zero_point
        k = y0 / s + z
        assert torch.allclose(k, k.round(), atol=1e-4)
        # the input is used as is: the output equals quantizing the plain conv of x
        assert torch.allclose(y0, first.aq(first._op(h, first.qweight())))
        assert q(x).unique().numel() > 8  # the last layer's output is not quantized
    with pytest.raises(ConfigError, match="act_placement"):
        QuantConfig(act_placement="middle")


def test_bad_quant_config_raises():
    for kw, match in (({"w_bits": 9}, "w_bits=9"), ({"a_bits": 1}, "a_bits=1"),
                      ({"first_last_bits": 12}, "first_last_bits"), ({"w_range": "max"}, "w_range"),
                      ({"attn_prob": "log10"}, "attn_prob")):
        with pytest.raises(ConfigError, match=match):
            QuantConfig(**kw)


# ---------------------------------------------------------------------------------------------
# AdaRound
# ---------------------------------------------------------------------------------------------
def _on_grid(layer: QuantLayer):
    w = layer.layer.weight
    wq = layer.wq
    k = wq.integer_weight(w)
    s, z = wq._sz(w)
    qw = layer.qweight()
    assert torch.equal(k, k.round()) and k.min() >= 0 and k.max() <= wq.qmax
    assert torch.equal(qw, (k - z) * s)  # exactly the dequantized integers
    return k


@pytest.mark.parametrize("conv", [True, False], ids=["conv", "linear"])
def test_adaround_frozen_weights_lie_on_the_grid(conv):
    torch.manual_seed(0)
    base = nn.Conv2d(8, 6, 3) if conv else nn.Linear(20, 7)
    layer = QuantLayer(base, w_bits=3, a_bits=4)
    w = layer.layer.weight.detach()
    k_nearest = layer.wq.integer_weight(w)
    soft0 = None
    layer.wq.init_adaround(w)
    with torch.no_grad():
        soft0 = layer.qweight().clone()
        # soft rounding starts at the FP weight (inside the clipping range)
        s, z = layer.wq._sz(w)
        inside = (w / s + z > 0.5) & (w / s + z < layer.wq.qmax - 0.5)
        assert torch.allclose(soft0[inside], w[inside], atol=float(s.max()) * 0.02)
        layer.wq.alpha.add_(torch.randn_like(layer.wq.alpha) * 3)  # as if trained
    assert not torch.allclose(layer.qweight(), (k_nearest - layer.wq._sz(w)[1]) * layer.wq._sz(w)[0])
    freeze(layer)
    assert layer.wq.mode == "hard" and not layer.wq.alpha.requires_grad
    k = _on_grid(layer)
    # AdaRound only chooses between floor and ceil: at most one step from nearest rounding
    assert (k - k_nearest).abs().max() <= 1
    # the hard choice is up exactly where the rounding variable is non-negative
    s, z = layer.wq._sz(w)
    up = (layer.wq.alpha >= 0).float()
    unclipped = (torch.floor(w / s) + z >= 0) & (torch.floor(w / s) + z + 1 <= layer.wq.qmax)
    assert torch.equal((k - torch.floor(w / s) - z)[unclipped], up[unclipped])


def test_nearest_rounding_is_on_the_grid_too():
    layer = QuantLayer(nn.Linear(16, 5), w_bits=4, a_bits=4)
    k = _on_grid(layer)
    w = layer.layer.weight.detach()
    s, z = layer.wq._sz(w)
    assert torch.equal(k, torch.clamp(torch.round(w / s) + z, 0, layer.wq.qmax))


def test_weight_set_bits_resets_rounding():
    layer = QuantLayer(nn.Linear(16, 5), w_bits=4, a_bits=4)
    layer.wq.init_adaround(layer.layer.weight.detach())
    layer.set_bits(w_bits=2)
    assert layer.wq.alpha is None and layer.wq.mode == "nearest" and layer.wq.qmax == 3
    assert layer.qweight().detach().unique().numel() <= 4 * 5


# ---------------------------------------------------------------------------------------------
# activation quantizer: observation, QDrop inside a layer
# ---------------------------------------------------------------------------------------------
def test_act_quantizer_observe_then_quantize_and_drop():
    torch.manual_seed(0)
    aq = ActQuantizer(3)
    x = torch.randn(32, 4, 5, 5)
    aq.observing = True
    assert torch.equal(aq(x), x)
    aq.finish_observing()
    assert int(aq.elems_per_sample) == 100 and bool(aq.q.initialized)
    xq = aq(x)
    assert xq.unique().numel() <= 8
    # QDrop: in training mode each element keeps its FP value with probability drop_prob
    aq.drop_prob, aq.training = 0.3, True
    mixed = aq(x)
    keep_fp = (mixed == x) & (xq != x)
    frac = keep_fp.float().sum() / (xq != x).float().sum()
    assert abs(float(frac) - 0.3) < 0.03
    assert torch.all((mixed == x) | (mixed == xq))
    aq.training = False  # never in eval
    assert torch.equal(aq(x), xq)
