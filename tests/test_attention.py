"""Quantized attention (ViT/DeiT ``Attention``, Swin ``WindowAttention``), the attention
converter registry, the post-softmax quantizers, and the post-LayerNorm reparameterisation.
Small random-weight models only (no network)."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

from packptq.config import ConfigError
from packptq.quant import (ATTENTION_CONVERTERS, QAttention, QuantConfig, QuantLayer, QWindowAttention,
                           act_quantizers, calibrate, quantize_model, register_attention, set_quant_state)
from packptq.quant.convert import convert_attention
from packptq.quant.quantizer import UniformQuantizer
from packptq.quant.vit import copy_ln_reparam, fold_channel_ranges, ln_linear_pairs


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# (timm name, img, kwargs, attention modules). Swin at 64 px with window 2 shifts windows
# (mask) in three stages; at 56 px with window 4 the 14x14 and 7x7 stages are padded.
MODELS = {
    "vit": ("vit_small_patch16_224", 32, dict(patch_size=8, depth=2), 2),
    "deit": ("deit_tiny_patch16_224", 32, dict(patch_size=8, depth=2), 2),
    "swin": ("swin_tiny_patch4_window7_224", 64, dict(window_size=2, depths=(2, 2, 2, 2), embed_dim=48), 8),
    "swin_padded": ("swin_tiny_patch4_window7_224", 56, dict(window_size=4, depths=(2, 2, 2, 2), embed_dim=48), 8),
}


def build(key: str):
    name, img, kw, n_attn = MODELS[key]
    model = timm.create_model(name, num_classes=10, img_size=img, **kw).eval()
    return model, torch.randn(4, 3, img, img), n_attn


@pytest.mark.parametrize("key", [pytest.param(k, marks=pytest.mark.slow) if k.startswith("swin") else k
                                 for k in MODELS])
def test_quantized_attention_equals_timm_forward(key):
    """Replacing timm's attention forward does not change the FP output: right after
    conversion (quantizers uncalibrated) and, after calibration, with quantizers disabled."""
    model, x, n_attn = build(key)
    ref = model(x)
    conv = copy.deepcopy(model)
    names = convert_attention(conv, QuantConfig())
    assert len(names) == n_attn
    cls = QWindowAttention if key.startswith("swin") else QAttention
    assert all(isinstance(conv.get_submodule(n), cls) for n in names)
    torch.testing.assert_close(conv(x), ref, atol=1e-5, rtol=1e-5)

    q = copy.deepcopy(model)
    quantize_model(q, QuantConfig(w_bits=4, a_bits=4, attn_prob="log2"), x[:2])
    calibrate(q, x)
    assert not torch.allclose(q(x), ref, atol=1e-3)  # the quantizers do act
    set_quant_state(q, weights=False, acts=False)
    torch.testing.assert_close(q(x), ref, atol=1e-5, rtol=1e-5)


def test_swin_shifted_window_mask_is_used():
    """The Swin model used above does shift windows (so the mask path is compared)."""
    model, _, _ = build("swin")
    masks = [b.attn_mask for st in model.layers for b in st.blocks if getattr(b, "attn_mask", None) is not None]
    assert masks and any((m != 0).any() for m in masks)


@pytest.mark.parametrize("mode", ["none", "additive", "bool", "causal"])
def test_qattention_masks_match_timm(mode):
    from timm.models.vision_transformer import Attention

    attn = Attention(32, num_heads=4, qkv_bias=True).eval()
    attn.fused_attn = False
    x = torch.randn(2, 5, 32)
    kw = {}
    if mode == "additive":
        kw["attn_mask"] = torch.randn(5, 5)
    elif mode == "bool":
        kw["attn_mask"] = torch.rand(5, 5) > 0.3
        kw["attn_mask"][:, 0] = True  # every query attends to something
    elif mode == "causal":
        kw["is_causal"] = True
    ref = attn(x, **kw)
    torch.testing.assert_close(QAttention(copy.deepcopy(attn), 8)(x, **kw), ref)


def test_attention_operands_are_calibrated():
    model, x, n_attn = build("deit")
    quantize_model(model, QuantConfig(w_bits=4, a_bits=4, attn_prob="log2"), x[:2])
    calibrate(model, x)
    attn = [m for m in model.modules() if isinstance(m, QAttention)]
    assert len(attn) == n_attn
    names = {n for n, _ in act_quantizers(model)}
    for m in attn:
        assert m.p_quant.kind == "log2" and m.q_quant.kind == "uniform"
        for aq in m.act_quantizers():
            assert bool(aq.q.initialized) and aq.bits == 4
    assert sum(n.endswith(("q_quant", "k_quant", "v_quant", "p_quant")) for n in names) == 4 * n_attn


@pytest.mark.parametrize("kind", ["uniform", "log2"])
def test_softmax_quantizer_grid(kind):
    """Quantized probabilities lie on the quantizer's grid: log2 is {0} U {s 2^(-k/2)}."""
    model, x, _ = build("deit")
    quantize_model(model, QuantConfig(w_bits=4, a_bits=3, attn_prob=kind), x[:2])
    calibrate(model, x)
    pq = model.blocks[0].attn.p_quant
    p = torch.rand(1000).softmax(0) * 50
    out = pq(p.clamp(0, 1))
    if kind == "log2":
        s = pq.q.scale
        k = -2 * torch.log2(out[out > 0] / s)
        torch.testing.assert_close(k, k.round(), atol=1e-4, rtol=0)
        assert k.max() < 2 ** 3 - 1 + 1e-4
    else:
        levels = out / pq.q.scale.abs() + pq.q.zero_point
        torch.testing.assert_close(levels, levels.round(), atol=1e-4, rtol=0)
    assert out.unique().numel() <= 2 ** 3


def test_converter_registry():
    """New attention types register a converter; the verb is not edited. Exact classes only."""
    from timm.models.swin_transformer import WindowAttention
    from timm.models.vision_transformer import Attention

    assert ATTENTION_CONVERTERS[Attention] and ATTENTION_CONVERTERS[WindowAttention]
    with pytest.raises(KeyError, match="twice"):
        register_attention(Attention)(lambda m, cfg: m)

    class MyAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)

        def forward(self, x):
            return self.proj(x)

    class Wrapped(nn.Module):
        def __init__(self, inner, bits):
            super().__init__()
            self.inner, self.bits = inner, bits

        def forward(self, x):
            return self.inner(x)

    class Sub(Attention):  # a subclass may change forward: not converted by Attention's rule
        pass

    model = nn.Sequential(MyAttention(), Sub(8, num_heads=2))
    register_attention(MyAttention)(lambda m, cfg: Wrapped(m, cfg.a_bits))
    try:
        names = convert_attention(model, QuantConfig(a_bits=5))
    finally:
        del ATTENTION_CONVERTERS[MyAttention]
    assert names == ["0"] and isinstance(model[0], Wrapped) and model[0].bits == 5
    assert type(model[1]) is Sub


def test_quant_attn_false_keeps_timm_attention():
    model, x, _ = build("deit")
    quantize_model(model, QuantConfig(quant_attn=False), x[:2])
    assert not any(isinstance(m, QAttention) for m in model.modules())
    assert isinstance(model.blocks[0].attn.qkv, QuantLayer)


# -- post-LayerNorm reparameterisation -------------------------------------------------------
def test_fold_channel_ranges_is_exact():
    """Per-channel quantization of the LN output followed by the Linear equals per-tensor
    quantization of the folded LN output followed by the folded Linear (weights in FP)."""
    C, D, bits = 16, 12, 4
    norm = nn.LayerNorm(C)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(C) * 4 + 0.05)
        norm.bias.copy_(torch.randn(C))
    layer = QuantLayer(nn.Linear(C, D), 8, bits)
    x = torch.randn(64, 7, C) * 3
    h = norm(x)
    pc = UniformQuantizer(bits, ch_axis=-1)
    pc.init_from(h.reshape(-1, C), method="mse")  # per channel (last axis)
    s, z = pc.scale.detach().clone(), pc.zero_point.clone()
    ref = layer.layer(pc(h))

    norm2, layer2 = copy.deepcopy(norm), copy.deepcopy(layer)
    s_t, z_t = fold_channel_ranges(norm2, layer2, s, z)
    pt = UniformQuantizer(bits)
    pt.scale.data = s_t.clone()
    pt.zero_point = z_t.clone()
    pt.initialized.fill_(True)
    out = layer2.layer(pt(norm2(x)))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    # and the FP function is unchanged
    torch.testing.assert_close(layer2.layer(norm2(x)), layer.layer(h), atol=1e-4, rtol=1e-4)
    assert not torch.equal(layer2.layer.weight, layer.layer.weight)  # weights did absorb r1


@pytest.mark.parametrize("key,n_pairs", [("deit", 4), pytest.param("swin", 16, marks=pytest.mark.slow),
                                         pytest.param("swin_padded", 12, marks=pytest.mark.slow)])
def test_ln_reparam_keeps_fp_function(key, n_pairs):
    """calibrate() folds every LN -> Linear pair (two per block), except those of the Swin
    stages whose windows are padded; the model's FP function does not change and the folded
    Linears' input quantizers hold the per-tensor ranges."""
    model, x, _ = build(key)
    ref = model(x)
    assert len(ln_linear_pairs(quantize_model(copy.deepcopy(model), QuantConfig(), x[:2]))) == 2 * len(
        [m for m in model.modules() if type(m).__name__ in ("Block", "SwinTransformerBlock")])
    q = copy.deepcopy(model)
    quantize_model(q, QuantConfig(w_bits=6, a_bits=6, ln_reparam=True), x[:2])
    calibrate(q, x)
    ranges = q.packptq_ln_ranges
    assert len(ranges) == n_pairs
    for name, (s, z) in ranges.items():
        aq = q.get_submodule(name)
        assert torch.equal(aq.q.scale.detach(), s) and torch.equal(aq.q.zero_point, z)
    out_q = q(x)
    assert torch.isfinite(out_q).all()
    set_quant_state(q, weights=False, acts=False)
    torch.testing.assert_close(q(x), ref, atol=1e-4, rtol=1e-4)
    calibrate(q, x)  # a second calibration does not fold again
    assert q.packptq_ln_ranges is ranges

    # the FP reference can take the same fold: then the folded Linears see the same inputs
    fp = copy.deepcopy(model)
    assert copy_ln_reparam(q, fp) == n_pairs
    torch.testing.assert_close(fp(x), ref, atol=1e-4, rtol=1e-4)
    lin = q.packptq_ln_folded[0][1]
    seen = {}
    for tag, m in (("q", q.get_submodule(lin)), ("fp", fp.get_submodule(lin))):
        m.register_forward_pre_hook(lambda _m, i, tag=tag: seen.__setitem__(tag, i[0].detach()))
    q(x), fp(x)
    torch.testing.assert_close(seen["q"], seen["fp"], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_ln_reparam_config_errors():
    with pytest.raises(ConfigError, match="act_placement"):
        QuantConfig(ln_reparam=True, act_placement="output")
    model = timm.create_model("resnet18", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    quantize_model(model, QuantConfig(ln_reparam=True), x)
    with pytest.raises(ConfigError, match="ln_reparam"):
        calibrate(model, x)
