"""Per-pack sensitivity and the bit setter (packptq.mp.sensitivity): the measured KL table, the
quantizers restored after it, activation bits that follow the weights, quantized attention."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from mp_models import acts_under, quantizer_state, tiny_quantized
from packptq.mp import kl_sensitivity, plan, set_group_bits
from packptq.quant import ActQuantizer, QuantConfig, QuantLayer


@pytest.mark.slow
def test_kl_sensitivity_shape_and_restores_the_quantizers():
    _, _, q, fsplit, qsplit, x = tiny_quantized()
    before_sd, before_bits = quantizer_state(q)
    packs = [[0, 1], [2, 3, 4], [5, 6, 7]]
    table = kl_sensitivity(qsplit, fsplit, packs, [2, 3, 4], x, torch.device("cpu"),
                                 act_bits_of=lambda b: b, batch_size=16)
    assert table.shape == (3, 3) and np.all(np.isfinite(table)) and np.all(table >= 0)
    after_sd, after_bits = quantizer_state(q)
    assert after_bits == before_bits
    assert after_sd.keys() == before_sd.keys()
    assert all(torch.equal(after_sd[k], before_sd[k]) for k in before_sd)


def test_kl_sensitivity_at_the_current_bits_is_the_output_kl_of_that_pack_alone():
    _, fp, q, fsplit, qsplit, x = tiny_quantized()
    table = kl_sensitivity(qsplit, fsplit, [[0, 1, 2, 3], [4, 5, 6, 7]], [3], x, torch.device("cpu"))
    # pack 1 alone at 3 bits: the FP model with blocks 4..7 swapped for the quantized ones
    hybrid = copy.deepcopy(fp)
    for b in range(4, 8):
        name = qsplit.block_names[b]
        parent, _, child = name.rpartition(".")
        setattr(hybrid.get_submodule(parent), child, copy.deepcopy(q.get_submodule(name)))
    with torch.no_grad():
        p, r = torch.log_softmax(fp(x), -1), torch.log_softmax(hybrid(x), -1)
    expected = float((p.exp() * (p - r)).sum(-1).mean())
    assert table[1, 0] == pytest.approx(expected, rel=1e-4, abs=1e-9)


def test_acts_follow_moves_activation_bits_and_fixed_leaves_them():
    _, _, q, _, qsplit, _ = tiny_quantized()
    block = [qsplit.blocks[2][1]]
    layer = next(m for m in block[0].modules() if isinstance(m, QuantLayer))
    old_scale = layer.aq.q.scale.detach().clone()
    qcfg = QuantConfig(w_bits=3, a_bits=3)
    follow = plan({"policy": "budget", "acts": "follow"}, qcfg)
    fixed = plan({"policy": "budget", "acts": "fixed"}, qcfg)
    assert (follow._acts(2), follow._acts(4), fixed._acts(2)) == (2, 4, None)

    set_group_bits(block, 2, fixed._acts(2))
    assert layer.wq.bits == 2 and all(a.bits == 3 for a in acts_under(block[0]))
    set_group_bits(block, 2, follow._acts(2))
    assert all(a.bits == 2 for a in acts_under(block[0]))
    assert not torch.equal(layer.aq.q.scale.detach(), old_scale)  # re-initialised for 2 bits


def test_attention_activation_quantizers_follow_their_pack():
    _, _, q, _, qsplit, _ = tiny_quantized("deit_tiny_patch16_224", "vit", 4, n=8)
    block = [qsplit.blocks[0][1]]
    set_group_bits(block, 4, 4)
    inner = [a for a in block[0].modules() if isinstance(a, ActQuantizer)]
    assert len(inner) > 4 and all(a.bits == 4 for a in inner)  # q, k, v, softmax and the Linears'
