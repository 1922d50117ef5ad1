"""The reconstruction cost prediction (``packptq.recon.cost``): every unit of a run gets a
positive prediction, logged at the start and kept beside the measured seconds in
``unit_XX.json``; a unit's prediction follows from its probe times and its weights;
``recon.predict=false`` switches the probe off."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_cfg
from packptq.recon import cost
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


def test_a_unit_is_predicted_from_its_probe_times_and_weights(trained_tiny, monkeypatch):
    from packptq.calibration import calibrate_twins
    from packptq.quant import QuantConfig
    from packptq.recon.sequence import Unit

    model, dm, _ = trained_tiny
    x, _ = dm.calib_tensors()
    twins = calibrate_twins(model, "resnet", QuantConfig(w_bits=4, a_bits=4), x, 0, 64, torch.device("cpu"))
    blocks = list(range(len(twins.block_names)))
    small = Unit("prefix_00", "prefix", [], twins.prefix_layers[0], [twins.prefix_layers[0]])
    big = Unit("pack_00", "blocks", blocks, None, twins.block_names)
    # the probe's timings stand in as known numbers: the FP forward+backward time of a unit is
    # proportional to its input's elements, the rounding work is 1 ns per weight, 10 us per tensor
    monkeypatch.setattr(cost, "fp_fwd_bwd_time", lambda module, x, device: 1e-9 * x.numel())
    monkeypatch.setattr(cost, "rounding_cost", lambda cfg, device: (1e-9, 1e-5))
    costs = predict_costs(twins, [small, big], [100, 0], x, ReconConfig(batch_size=16))
    assert costs["pack_00"].n_weights > 50 * costs["prefix_00"].n_weights
    for c in costs.values():
        step = cost.FP_FACTOR * c.fp_s + cost.WEIGHT_FACTOR * (1e-9 * c.n_weights + 1e-5 * c.n_tensors) + \
            cost.STEP_OVERHEAD_S
        assert c.step_s == pytest.approx(step)
    assert costs["prefix_00"].seconds == pytest.approx(100 * costs["prefix_00"].step_s + cost.FIT_OVERHEAD_S)
    assert costs["pack_00"].seconds == 0.0  # no steps, no fit
    assert costs["prefix_00"].fp_s == pytest.approx(1e-9 * 16 * x[0].numel())  # the unit's real input, one batch
    assert costs["prefix_00"].step_s < costs["pack_00"].step_s
    # the FP twin keeps its state: no gradients, eval mode
    assert all(p.grad is None for p in twins.fp.parameters()) and not twins.fp.training


def test_rounding_cost_is_the_line_through_the_two_probe_sizes(monkeypatch):
    """The step time of a quantized Linear(n, n) at n = 256 and 1024 gives the cost per rounding
    variable (the slope against n * n) and per weight tensor (the intercept)."""
    a, b = 2e-9, 3e-4
    times = iter([a * 256 ** 2 + b, a * 1024 ** 2 + b])
    monkeypatch.setattr(cost, "_best_time", lambda fn, device, reps=2: next(times))
    assert rounding_cost(ReconConfig(iters=10), torch.device("cpu")) == (pytest.approx(a), pytest.approx(b))


def test_rounding_cost_of_a_noisy_probe_is_clamped(monkeypatch):
    """A larger layer timed faster (load from other jobs) gives no negative cost: slope 0, the
    small layer's time as the per-tensor cost; an intercept below 0 is 0."""
    times = iter([5e-4, 4e-4])
    monkeypatch.setattr(cost, "_best_time", lambda fn, device, reps=2: next(times))
    assert rounding_cost(ReconConfig(iters=10), torch.device("cpu")) == (0.0, 5e-4)
    times = iter([1e-4, 1e-4 + 2e-9 * (1024 ** 2 - 256 ** 2) * 2])  # slope 4e-9: intercept 1e-4 - 4e-9 * 256^2 < 0
    monkeypatch.setattr(cost, "_best_time", lambda fn, device, reps=2: next(times))
    per_weight, per_tensor = rounding_cost(ReconConfig(iters=10), torch.device("cpu"))
    assert per_weight == pytest.approx(4e-9) and per_tensor == 0.0
