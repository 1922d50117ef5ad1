"""Pack-wise mixed precision in the pipeline (packptq.mp.plan): exact budget runs whose bits.json
matches the model, the feasibility check before any FP training, the official rule's honest
average, resume from the sensitivity table, the plan's resolved settings, and the mp_sweep
experiment configs.

Full runs use the conftest TINY setting (a narrow resnet18 on the 16x16 digits) at a W3A3
target; the FP model is the session's ``trained_tiny``."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from conftest import CONF, compose_cfg, tiny_cfg
from mp_models import acts_under
from packptq import pipeline
from packptq.artifacts import RunDir
from packptq.config import ConfigError, typed
from packptq.mp import MixedPrecision, load_bits_json, plan, sensitivity
from packptq.quant import QuantConfig, quant_layers
from packptq.zoo import split_model


def mp_cfg(run_dir: Path, *overrides: str):
    return tiny_cfg(run_dir, "quant=w3a3", *overrides)


@pytest.fixture
def spy(monkeypatch):
    """Captures the quantized model the pipeline accounts bits for (right after allocation)."""
    seen = {}
    import importlib

    mp_plan = importlib.import_module("packptq.mp.plan")  # the module (packptq.mp.plan is also a function)

    original = mp_plan.bit_accounting

    def wrapped(qmodel):
        seen["qmodel"] = qmodel
        return original(qmodel)

    monkeypatch.setattr(mp_plan, "bit_accounting", wrapped)  # the bits phase (mp.run) calls it
    return seen


def layers_under(qmodel, prefixes):
    return [(n, m) for n, m in quant_layers(qmodel) if any(n.startswith(p + ".") for p in prefixes)]


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
    # activations follow the weights and are held to their own average (quant.a_bits = 3) too:
    # equal weight and activation averages to a uniform W3A3 model's, first/last layer aside
    assert r["mp"]["a_avg_bits"] == 3.0
    assert r["mp"]["achieved_a_bits"] == pytest.approx(r["a_bits_avg"], abs=1e-12)
    uniform = pipeline.run(mp_cfg(tmp_path / "uniform", "packing=none"))
    assert r["a_bits_avg"] <= uniform["a_bits_avg"] + 1e-12 and r["w_bits_avg"] <= uniform["w_bits_avg"] + 1e-12
    assert r["n_weights"] == sum(m.layer.weight.numel() for _, m in quant_layers(qmodel))

    packs, alloc, acts = load_bits_json(RunDir(run_dir).read_json("bits.json"))
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

    sens = RunDir(run_dir).read_json("sensitivity.json")
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

    monkeypatch.setattr(sensitivity, "kl_sensitivity", boom)
    again = pipeline.run(cfg)
    assert again["bits"] == first["bits"] and again["w_bits_avg"] == first["w_bits_avg"] <= 3.5


@pytest.mark.slow
def test_official_run_reports_its_achieved_average(tmp_path, trained_tiny, spy):
    r = pipeline.run(mp_cfg(tmp_path / "run", "mp=official", "packing=block", "packing.loss=official",
                            "recon.iters=0"))
    mp = r["mp"]
    assert mp["policy"] == "official" and mp["candidates"] == [3, 4] and mp["sensitivity"] == "omega"
    assert mp["avg_bits"] == 3.5  # the rule's (mid + high) / 2 budget
    assert mp["achieved_w_bits"] == pytest.approx(r["w_bits_avg"], abs=1e-12)
    assert (mp["prefix_bits"], mp["suffix_bits"]) == (4, 4)  # the boundary at high, not at 8
    assert 4 in r["bits"] and 3 in r["bits"]  # eight one-block packs: some upgrades fit, not all
    assert r["w_bits_avg"] > 3.0  # "W3A3 + MP" is not a 3-bit model, and says so
    assert r["omega"] is not None  # omega was scored although block packing needs no scores
    q = spy["qmodel"]
    for names, w in zip(r["packs"], r["bits"]):
        assert all(m.wq.bits == w and m.aq.bits == w for _, m in layers_under(q, names))  # acts follow
    # the storage the rule budgets: weights plus per-sample activations, at most 3.5 bits each
    from packptq.quant import act_quantizers, quant_layers

    w = [(m.layer.weight.numel(), m.wq.bits) for _, m in quant_layers(q)]
    a = [(int(m.elems_per_sample), m.bits) for _, m in act_quantizers(q)]
    bits = sum(n * b for n, b in w + a)
    elems = sum(n for n, _ in w + a)
    assert bits <= 3.5 * elems
    # and the next upgrade by score would not have fit (the rule is greedy, not loose)
    assert r["a_bits_avg"] > 3.0


def test_official_rule_needs_the_official_score(tmp_path):
    with pytest.raises(ConfigError, match="set packing.loss=official"):
        pipeline.run(mp_cfg(tmp_path / "run", "mp=official", "packing=block"))


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


# -- the plan ---------------------------------------------------------------------------------
def test_plan_resolves_boundary_bits_from_first_last_bits():
    p = plan({"policy": "official", "sensitivity": "omega"}, QuantConfig(w_bits=3, a_bits=3))
    assert (p.prefix_bits, p.suffix_bits, p.candidates, p.target_avg_bits) == (4, 4, (3, 4), 3.5)
    p = plan({"policy": "official", "sensitivity": "omega"},
                   QuantConfig(w_bits=3, a_bits=3, first_last_bits=None))
    assert (p.prefix_bits, p.suffix_bits) == (4, 4)  # official's default: the high candidate
    p = plan({"policy": "budget", "suffix_bits": 6}, QuantConfig(w_bits=3, a_bits=3))
    assert (p.prefix_bits, p.suffix_bits, p.target_avg_bits) == (8, 6, 3.0)
    assert p.needs_omega is False
    assert plan({"policy": "budget", "sensitivity": "omega"}, QuantConfig()).needs_omega
    with pytest.raises(ConfigError, match="mp.policy"):
        plan({"policy": "greedy"}, QuantConfig())


def test_plan_types_the_section_once_and_returns_none_for_none():
    assert plan({"policy": "none"}, QuantConfig()) is None
    assert plan(None, QuantConfig()) is None
    assert plan(OmegaConf.create({"policy": "none", "acts": "fixed"}), QuantConfig()) is None
    with pytest.raises(ConfigError, match="only used by mp.policy=budget"):
        plan({"policy": "none", "avg_bits": 3.0}, QuantConfig())
    with pytest.raises(ConfigError, match="do nothing with mp.policy=none"):
        plan({"policy": "none", "prefix_bits": 4}, QuantConfig())
    p = plan(OmegaConf.create({"policy": "budget", "avg_bits": 9.0}), QuantConfig(w_bits=3, a_bits=3))
    assert isinstance(p, MixedPrecision) and p.cfg.avg_bits == 9.0 and p.target_avg_bits == 9.0
    assert (p.cfg.prefix_bits, p.cfg.suffix_bits) == (8, 8)  # pinned to what the allocation uses
    d = p.describe()
    assert set(d) == {"policy", "avg_bits", "target_w_bits", "target_a_bits", "achieved_w_bits", "a_avg_bits",
                      "achieved_a_bits", "candidates", "budget",
                      "sensitivity", "acts", "solver", "prefix_bits", "suffix_bits", "feasible_range", "cost",
                      "bits", "a_bits"}
    assert (d["policy"], d["avg_bits"], d["candidates"], d["sensitivity"], d["achieved_w_bits"]) == \
        ("budget", 9.0, [2, 3, 4], "kl", None)
    with pytest.raises(ConfigError, match="mp.policy=official has bit choices for targets"):
        plan({"policy": "official", "sensitivity": "omega"}, QuantConfig(w_bits=8, a_bits=8))


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
    mp_plan = plan(cfg.mp, qcfg)
    assert (mp_plan is None) == (cfg.mp.policy == "none")


def test_budget_pins_the_first_and_last_layer_only_as_a_uniform_run_does():
    """MobileNetV2's suffix holds conv_head before the classifier: with mp=budget only the first
    and the last layer take quant.first_last_bits, conv_head stays at the target, so the lowest
    reachable average (every pack at the 2-bit target) is the uniform W2 model's own average."""
    import copy

    import timm
    import torch

    from packptq.mp.accounting import bit_accounting, quantized_layers
    from packptq.quant import QuantConfig as QC, quantize_model
    from packptq.zoo import split_model

    torch.manual_seed(0)
    model = timm.create_model("mobilenetv2_050", num_classes=10, in_chans=1).eval()
    split = split_model(model, "mobilenetv2")
    suffix = quantized_layers([m for _, m in split.suffix.submodules()])
    assert len(suffix) >= 2  # conv_head and the classifier
    q = quantize_model(copy.deepcopy(model), QC(w_bits=2, a_bits=4), torch.randn(2, 1, 32, 32))
    uniform = bit_accounting(q)["w_bits_avg"]
    p = plan({"policy": "budget", "budget": "uniform"}, QC(w_bits=2, a_bits=4))
    lo, hi = p.check_feasible(model, split)
    assert lo == pytest.approx(uniform, abs=1e-9) and hi > lo
    # the official rule keeps its own convention: the whole prefix and suffix at its high bits
    off = plan({"policy": "official", "sensitivity": "omega"}, QC(w_bits=3, a_bits=3))
    assert off.allocator.boundary == "units" and p.allocator.boundary == "edges"
