"""The calibration phase (packptq/calibration.py): the twins it returns."""
from __future__ import annotations

import torch

from packptq.calibration import calibrate_twins
from packptq.evaluate import capture
from packptq.quant import QuantConfig, set_quant_state
from packptq.zoo.build import ModelConfig, build_model


def small_deit():
    torch.manual_seed(0)
    return build_model(ModelConfig(name="deit_tiny_patch16_224", family="vit", patch_size=4, kwargs={"depth": 2}),
                       {"num_classes": 10, "in_chans": 1, "img_size": 16}).eval()


def test_ln_reparam_reaches_the_fp_reference_of_layer_units():
    """With quant.ln_reparam the qkv and fc1 Linears read a folded LayerNorm output. A layer unit
    mixes (QDrop) and compares its quantized-model input with the FP reference's input of the same
    Linear: with quantizers off, the two must be the same tensor, not one folded and one not."""
    model = small_deit()
    x = torch.randn(16, 1, 16, 16)
    twins = calibrate_twins(model, "vit", QuantConfig(w_bits=4, a_bits=4, ln_reparam=True), x, 0, 16,
                            torch.device("cpu"))
    folded = [lin for _, lin in twins.qmodel.packptq_ln_folded]
    assert sorted(folded) == ["blocks.0.attn.qkv", "blocks.0.mlp.fc1", "blocks.1.attn.qkv", "blocks.1.mlp.fc1"]
    set_quant_state(twins.qmodel, weights=False, acts=False)
    for name in folded:
        q_in, _ = capture(twins.qmodel, x, twins.qmodel.get_submodule(name), 16, torch.device("cpu"))
        f_in, _ = capture(twins.fp, x, twins.fp.get_submodule(name), 16, torch.device("cpu"))
        torch.testing.assert_close(q_in, f_in, rtol=1e-4, atol=1e-5)
    # the fold leaves the network's function alone
    with torch.no_grad():
        torch.testing.assert_close(twins.fp(x), model(x), rtol=1e-4, atol=1e-4)
