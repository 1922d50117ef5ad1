"""Bit accounting (packptq.mp.accounting): averages and storage on a hand-computed example,
bits.json, and the one weight count on unquantized and quantized models."""
from __future__ import annotations

import json

import pytest

from mp_models import tiny_quantized
from packptq.mp import (MPConfig, act_bits, allocate, avg_act_bits, avg_weight_bits, bit_accounting, bits_json,
                        load_bits_json, model_size_bytes, weight_count, weight_counts)
from packptq.quant import act_quantizers, quant_layers
from packptq.twins import layer_groups
from packptq.zoo import split_model


def budget_cfg(**kw):
    return MPConfig(policy="budget", **kw)


def test_accounting_on_a_hand_computed_example():
    assert avg_weight_bits([10, 30], [2, 4]) == 3.5
    assert avg_act_bits([1000, 3000, 4000], [8, 4, 2]) == (8000 + 12000 + 8000) / 8000
    layers = [
        (100, 3, 4, True),   # ceil(300/8)=38 + 4*(4 scale + 1 zp) + 4*4 bias = 74
        (10, 8, 2, False),   # 10 + 2*5 = 20
        (50, 32, 5, True),   # float: 200 + 20 bias = 220
    ]
    assert model_size_bytes(layers) == 74 + 20 + 220
    with pytest.raises(ValueError):
        model_size_bytes([(10, 12, 1, False)])
    with pytest.raises(ValueError):
        avg_weight_bits([1, 2], [3])
    follow, fixed = MPConfig(acts="follow"), MPConfig(acts="fixed")
    assert act_bits(follow, 3, 3, [2, 3, 4]) == [2, 3, 4]
    assert act_bits(follow, 4, 8, [3, 4, 5]) == [7, 8, 8]
    assert act_bits(fixed, 3, 4, [2, 3, 4]) == [4, 4, 4]


def test_bits_json_roundtrip():
    a = allocate(budget_cfg(avg_bits=3.0), 3, [10, 20], cost=[{2: 3.0, 3: 1.0, 4: 0.5}] * 2,
                 prefix_weights=4, suffix_weights=6)
    names = [["blocks.0", "blocks.1"], ["blocks.2"]]
    acts = act_bits(MPConfig(), 3, 3, a.bits)
    d = json.loads(json.dumps(bits_json(names, a, acts)))
    assert d["version"] == 1
    assert [p["w_bits"] for p in d["packs"]] == list(a.bits)
    assert d["avg_bits"] == a.avg_bits and d["solver"] == "dp"
    names2, a2, acts2 = load_bits_json(d)
    assert names2 == names and a2 == a and acts2 == acts
    assert a.summary()["n_weights"] == 40
    with pytest.raises(ValueError, match="version"):
        load_bits_json({**d, "version": 2})


@pytest.mark.parametrize("name,family,patch", [("resnet18", "resnet", None), ("deit_tiny_patch16_224", "vit", 4)])
def test_weight_counts_before_quantization_match_the_quantized_layers(name, family, patch):
    model, _, q, _, qsplit, x = tiny_quantized(name, family, patch, n=4)
    blocks, pre, suf = weight_counts(split_model(model, family))
    prefix_layers, block_layers, suffix_layers = layer_groups(q, qsplit, x[:2])
    numel = {n: m.layer.weight.numel() for n, m in quant_layers(q)}
    assert blocks == [sum(numel[n] for n in bl) for bl in block_layers]
    assert pre == sum(numel[n] for n in prefix_layers) and suf == sum(numel[n] for n in suffix_layers)
    assert sum(blocks) + pre + suf == sum(numel.values())
    assert weight_counts(qsplit) == (blocks, pre, suf)  # the same count on the quantized twin
    assert weight_count([model]) == weight_count([q]) == sum(numel.values())


def test_bit_accounting_of_a_quantized_model():
    _, _, q, _, _, _ = tiny_quantized()
    layers = [m for _, m in quant_layers(q)]
    layers[0].wq.bits = 8
    acct = bit_accounting(q)
    counts = [m.layer.weight.numel() for m in layers]
    assert acct["n_weights"] == sum(counts)
    assert acct["w_bits_avg"] == avg_weight_bits(counts, [m.wq.bits for m in layers])
    acts = [(int(a.elems_per_sample), a.bits) for _, a in act_quantizers(q) if int(a.elems_per_sample) > 0]
    assert acts and acct["a_bits_avg"] == avg_act_bits([e for e, _ in acts], [b for _, b in acts])
    assert 3.0 < acct["a_bits_avg"] < 8.0  # W3A3 with the first and last layers at 8 bits
    assert acct["size_bytes"] == model_size_bytes(
        [(n, m.wq.bits, m.layer.weight.shape[0], m.layer.bias is not None) for n, m in zip(counts, layers)])
