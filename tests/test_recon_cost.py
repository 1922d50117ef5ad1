"""The reconstruction cost prediction (``packptq.recon.cost``): every unit of a run gets a
positive prediction, printed at the start and kept beside the measured seconds in
``unit_XX.json``; a big pack is predicted above a single small layer; ``recon.predict=false``
switches the probe off."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_cfg
from packptq.recon.cost import predict_costs, rounding_cost
from packptq.recon.unit import ReconConfig


def _unit_records(run_dir):
    return [json.loads(p.read_text()) for p in sorted(run_dir.glob("unit_*.json"))]


def test_every_unit_records_predicted_and_measured_seconds(trained_tiny, tmp_path, packptq_log):
    from packptq import pipeline

    res = pipeline.run(tiny_cfg(tmp_path, "packing=block"))
    out = packptq_log.text
    recs = _unit_records(tmp_path)
    assert [r["key"] for r in recs] == res["unit_keys"] and len(recs) > 3
    assert "recon: predicted" in out and f"for {len(recs)} unit(s)" in out
    for r in recs:
        assert r["seconds"] > 0 and r["cache_seconds"] >= 0
        assert r["predicted_seconds"] > 0 and r["predicted_step_s"] > 0
        assert f"  {r['key']}: {r['predicted_seconds']:.1f} s = 20 steps" in out
    packs = [r for r in recs if r["key"].startswith("pack_")]
    assert all(r["n_weights"] > 0 for r in packs)


def test_predict_false_runs_no_probe_and_the_probe_changes_no_result(trained_tiny, tmp_path, packptq_log,
                                                                    monkeypatch):
    from packptq import pipeline
    from packptq.recon import cost

    with_probe = pipeline.run(tiny_cfg(tmp_path / "on", "recon.iters=4"))
    monkeypatch.setattr(cost, "predict_costs", lambda *a, **k: pytest.fail("probe ran with recon.predict=false"))
    packptq_log.clear()
    without = pipeline.run(tiny_cfg(tmp_path / "off", "recon.predict=false", "recon.iters=4"))
    assert "recon: predicted" not in packptq_log.text
    for r in _unit_records(tmp_path / "off"):
        assert r["seconds"] > 0 and "predicted_seconds" not in r
    # the probe leaves the random streams alone: the same losses and accuracy either way
    on, off = _unit_records(tmp_path / "on"), _unit_records(tmp_path / "off")
    assert [r["loss"] for r in on] == [r["loss"] for r in off]
    assert with_probe["quant_top1"] == without["quant_top1"]


def test_a_big_pack_is_predicted_above_a_small_layer(trained_tiny):
    from packptq.calibration import calibrate_twins
    from packptq.quant import QuantConfig
    from packptq.recon.sequence import Unit

    model, dm, _ = trained_tiny
    x, _ = dm.calib_tensors()
    twins = calibrate_twins(model, "resnet", QuantConfig(w_bits=4, a_bits=4), x, 0, 64, torch.device("cpu"))
    blocks = list(range(len(twins.block_names)))
    small = Unit("prefix_00", "prefix", [], twins.prefix_layers[0], [twins.prefix_layers[0]])
    big = Unit("pack_00", "blocks", blocks, None, twins.block_names)
    costs = predict_costs(twins, [small, big], [100, 100], x, ReconConfig(batch_size=16))
    assert costs["pack_00"].n_weights > 50 * costs["prefix_00"].n_weights
    assert 0 < costs["prefix_00"].seconds < costs["pack_00"].seconds
    assert 0 < costs["prefix_00"].fp_s < costs["pack_00"].fp_s
    # the FP twin keeps its state: no gradients, eval mode
    assert all(p.grad is None for p in twins.fp.parameters()) and not twins.fp.training


def test_rounding_cost_is_positive():
    per_weight, per_tensor = rounding_cost(ReconConfig(), torch.device("cpu"))
    assert per_weight > 0 and per_tensor >= 0
