"""Pack-wise mixed precision in the pipeline (packptq.mixed): exact budget runs whose bits.json
matches the model, the feasibility check before any FP training, the official rule's honest
average, the measured sensitivity table, activation bits that follow the weights, resume, and
the mp_sweep experiment configs.

Full runs use the conftest TINY setting (a narrow resnet18 on the 16x16 digits) at a W3A3
target; the FP model is the session's ``trained_tiny``."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import CONF, compose_cfg, tiny_cfg
from packptq import mixed, pipeline
from packptq.config import ConfigError, typed
from packptq.precision import load_bits_json
from packptq.quant import (ActQuantizer, QuantConfig, QuantLayer, WeightQuantizer, calibrate, fold_bn,
                           quant_layers, quantize_model)
from packptq.zoo import split_model
from packptq.zoo.build import ModelConfig, build_model

#: small versions of the models, same structure: resnet18 as in conftest.TINY, a 3-block deit_tiny
SMALL = {"resnet18": {"channels": [8, 16, 32, 64]}, "deit_tiny_patch16_224": {"depth": 3}}


def mp_cfg(run_dir: Path, *overrides: str):
    return tiny_cfg(run_dir, "quant=w3a3", *overrides)


@pytest.fixture
def spy(monkeypatch):
    """Captures the quantized model the pipeline accounts bits for (right after allocation)."""
    seen = {}
    original = pipeline.bit_accounting

    def wrapped(qmodel):
        seen["qmodel"] = qmodel
        return original(qmodel)

    monkeypatch.setattr(pipeline, "bit_accounting", wrapped)
    return seen


def layers_under(qmodel, prefixes):
    return [(n, m) for n, m in quant_layers(qmodel) if any(n.startswith(p + ".") for p in prefixes)]


def acts_under(module):
    """Enabled activation quantizers inside ``module`` (a disabled one never quantizes)."""
    out = []
    for m in module.modules():
        if isinstance(m, QuantLayer) and not m.act_enabled:
            continue
        out += [a for a in m.children() if isinstance(a, ActQuantizer)]
    return out


# -- full runs -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_budget_run_meets_the_budget_and_bits_json_matches_the_model(tmp_path, trained_tiny, spy):
    run_dir = tmp_path / "run"
    r = pipeline.run(mp_cfg(run_dir, "mp=budget", "mp.avg_bits=3.0"))
    qmodel = spy["qmodel"]

    # a true average over every quantized weight, prefix and suffix (8 bits here) included
    assert r["w_bits_avg"] <= 3.0
    assert r["mp"]["achieved_w_bits"] == pytest.approx(r["w_bits_avg"], abs=1e-12)
    assert r["mp"]["avg_bits"] == 3.0 and r["mp"]["policy"] == "budget"
    assert r["n_weights"] == sum(m.layer.weight.numel() for _, m in quant_layers(qmodel))

    packs, alloc, acts = load_bits_json(pipeline.RunDir(run_dir).read_json("bits.json"))
    assert packs == r["packs"] and list(alloc.bits) == r["bits"]
    assert alloc.avg_bits == pytest.approx(r["w_bits_avg"], abs=1e-12)
    assert alloc.prefix_bits == alloc.suffix_bits == 8  # quant.first_last_bits
    # all-3 is over budget once the 8-bit boundary counts, so some pack went down to 2
    assert 2 in alloc.bits
    blocks = dict(split_model(qmodel, "resnet").blocks)
    for names, w, a, size in zip(packs, alloc.bits, acts, alloc.sizes):
        layers = layers_under(qmodel, names)
        assert layers and all(m.wq.bits == w for _, m in layers)
        assert sum(m.layer.weight.numel() for _, m in layers) == size
        assert a == w  # acts=follow at a W3A3 target: the pack's activations take its bits
        assert all(q.bits == a for b in names for q in acts_under(blocks[b]))
    boundary = [m for n, m in quant_layers(qmodel) if not any(n.startswith(b + ".") for p in packs for b in p)]
    assert boundary and all(m.wq.bits == 8 for m in boundary)

    sens = pipeline.RunDir(run_dir).read_json("sensitivity.json")
    table = np.asarray(sens["table"])
    assert sens["kind"] == "kl" and sens["candidates"] == [2, 3, 4] and sens["packs"] == packs
    assert table.shape == (len(packs), 3)
    assert np.all(np.isfinite(table)) and np.all(table >= 0)
    assert table[:, 0].sum() > table[:, 2].sum()  # 2 bits hurt more than 4, summed over packs


@pytest.mark.slow
def test_budget_run_resumes_from_its_sensitivity_table(tmp_path, trained_tiny, monkeypatch):
    cfg = mp_cfg(tmp_path / "run", "mp=budget", "mp.avg_bits=3.5", "packing=block", "recon.iters=0")
    first = pipeline.run(cfg)

    def boom(*a, **k):
        raise AssertionError("the sensitivity table was measured again")

    monkeypatch.setattr(mixed, "kl_sensitivity", boom)
    again = pipeline.run(cfg)
    assert again["bits"] == first["bits"] and again["w_bits_avg"] == first["w_bits_avg"] <= 3.5


@pytest.mark.slow
def test_official_run_reports_its_achieved_average(tmp_path, trained_tiny, spy):
    r = pipeline.run(mp_cfg(tmp_path / "run", "mp=official", "packing=block", "recon.iters=0"))
    mp = r["mp"]
    assert mp["policy"] == "official" and mp["candidates"] == [3, 4] and mp["sensitivity"] == "omega"
    assert mp["avg_bits"] == 3.5  # the rule's (mid + high) / 2 budget
    assert mp["achieved_w_bits"] == pytest.approx(r["w_bits_avg"], abs=1e-12)
    assert r["w_bits_avg"] <= 3.5
    assert 4 in r["bits"]  # eight one-block packs: some upgrade fits
    assert r["w_bits_avg"] > 3.0  # "W3A3 + MP" is not a 3-bit model, and says so
    assert r["omega"] is not None  # omega was scored although block packing needs no scores
    for names, w in zip(r["packs"], r["bits"]):
        assert all(m.wq.bits == w for _, m in layers_under(spy["qmodel"], names))


@pytest.mark.parametrize("avg", [1.5, 2.0, 4.5, 9])
def test_an_impossible_budget_stops_before_fp_training(tmp_path, avg):
    cache = tmp_path / "cache"  # empty: nothing may be trained into it
    cfg = mp_cfg(tmp_path / "run", f"cache_dir={cache}", "mp=budget", f"mp.avg_bits={avg}")
    with pytest.raises(ConfigError, match=r"feasible range of mp.avg_bits is \[2\.\d{4}, 4\.\d{4}\]"):
        pipeline.run(cfg)
    assert not (cache / "fp").exists()  # no FP model was trained


def test_mp_none_rejects_boundary_bits_it_would_ignore(tmp_path):
    cfg = mp_cfg(tmp_path / "run", f"cache_dir={tmp_path / 'cache'}", "mp=none", "mp.suffix_bits=4")
    with pytest.raises(ConfigError, match="do nothing with mp.policy=none"):
        pipeline.run(cfg)


# -- pieces -----------------------------------------------------------------------------------
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


@pytest.mark.parametrize("name,family,patch", [("resnet18", "resnet", None), ("deit_tiny_patch16_224", "vit", 4)])
def test_weight_counts_before_quantization_match_the_quantized_layers(name, family, patch):
    model, _, q, _, qsplit, x = tiny_quantized(name, family, patch, n=4)
    blocks, pre, suf = mixed.weight_counts(model, split_model(model, family))
    prefix_layers, block_layers, suffix_layers = pipeline.layer_groups(q, qsplit, x[:2])
    numel = {n: m.layer.weight.numel() for n, m in quant_layers(q)}
    assert blocks == [sum(numel[n] for n in bl) for bl in block_layers]
    assert pre == sum(numel[n] for n in prefix_layers) and suf == sum(numel[n] for n in suffix_layers)
    assert sum(blocks) + pre + suf == sum(numel.values())


@pytest.mark.slow
def test_kl_sensitivity_shape_and_restores_the_quantizers():
    _, _, q, fsplit, qsplit, x = tiny_quantized()
    before_sd, before_bits = quantizer_state(q)
    packs = [[0, 1], [2, 3, 4], [5, 6, 7]]
    table = mixed.kl_sensitivity(qsplit, fsplit, packs, [2, 3, 4], x, torch.device("cpu"),
                                 act_bits_of=lambda b: b, batch_size=16)
    assert table.shape == (3, 3) and np.all(np.isfinite(table)) and np.all(table >= 0)
    after_sd, after_bits = quantizer_state(q)
    assert after_bits == before_bits
    assert after_sd.keys() == before_sd.keys()
    assert all(torch.equal(after_sd[k], before_sd[k]) for k in before_sd)


def test_kl_sensitivity_at_the_current_bits_is_the_output_kl_of_that_pack_alone():
    _, fp, q, fsplit, qsplit, x = tiny_quantized()
    table = mixed.kl_sensitivity(qsplit, fsplit, [[0, 1, 2, 3], [4, 5, 6, 7]], [3], x, torch.device("cpu"))
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
    follow = mixed.plan({"policy": "budget", "acts": "follow"}, qcfg)
    fixed = mixed.plan({"policy": "budget", "acts": "fixed"}, qcfg)
    assert (follow._acts(2), follow._acts(4), fixed._acts(2)) == (2, 4, None)

    mixed.set_group_bits(block, 2, fixed._acts(2))
    assert layer.wq.bits == 2 and all(a.bits == 3 for a in acts_under(block[0]))
    mixed.set_group_bits(block, 2, follow._acts(2))
    assert all(a.bits == 2 for a in acts_under(block[0]))
    assert not torch.equal(layer.aq.q.scale.detach(), old_scale)  # re-initialised for 2 bits


def test_attention_activation_quantizers_follow_their_pack():
    _, _, q, _, qsplit, _ = tiny_quantized("deit_tiny_patch16_224", "vit", 4, n=8)
    block = [qsplit.blocks[0][1]]
    mixed.set_group_bits(block, 4, 4)
    inner = [a for a in block[0].modules() if isinstance(a, ActQuantizer)]
    assert len(inner) > 4 and all(a.bits == 4 for a in inner)  # q, k, v, softmax and the Linears'


def test_plan_resolves_boundary_bits_from_first_last_bits():
    p = mixed.plan({"policy": "official", "sensitivity": "omega"}, QuantConfig(w_bits=3, a_bits=3))
    assert (p.prefix_bits, p.suffix_bits, p.candidates, p.target_avg_bits) == (8, 8, (3, 4), 3.5)
    p = mixed.plan({"policy": "official", "sensitivity": "omega"},
                   QuantConfig(w_bits=3, a_bits=3, first_last_bits=None))
    assert (p.prefix_bits, p.suffix_bits) == (4, 4)  # precision's default: the high candidate
    p = mixed.plan({"policy": "budget", "suffix_bits": 6}, QuantConfig(w_bits=3, a_bits=3))
    assert (p.prefix_bits, p.suffix_bits, p.target_avg_bits) == (8, 6, 3.0)
    assert p.needs_omega is False
    assert mixed.plan({"policy": "budget", "sensitivity": "omega"}, QuantConfig()).needs_omega
    with pytest.raises(ConfigError, match="mp.policy"):
        mixed.plan({"policy": "greedy"}, QuantConfig())


# -- configs ----------------------------------------------------------------------------------
SWEEPS = sorted(p.stem for p in (CONF / "experiment").glob("mp_sweep*.yaml"))


@pytest.mark.parametrize("experiment", SWEEPS)
@pytest.mark.parametrize("case", [["mp=budget", "mp.avg_bits=2.5"], ["mp=none", "quant.w_bits=2"], ["mp=official"]])
def test_mp_sweep_experiments_compose(experiment, case):
    assert SWEEPS, "no conf/experiment/mp_sweep*.yaml"
    cfg = compose_cfg([f"experiment={experiment}", *case, "run_dir=/tmp/x"], return_hydra_config=True)
    qcfg = typed(QuantConfig, cfg.quant, "quant")
    assert qcfg.a_bits == qcfg.w_bits  # uniform baselines are WkAk, like the packs under acts=follow
    assert OmegaConf.to_container(cfg.hydra.sweeper.params)["seed"]
    plan = pipeline._mp_setup(cfg, qcfg)
    assert (plan is None) == (cfg.mp.policy == "none")
