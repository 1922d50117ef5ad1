"""The reconstruction activation cache: the budget parser, the mode each unit gets against a
budget, the stores of every mode serving the batches of the in-memory float32 cache (exactly, or
within float16 / float rounding), the batch-by-batch builders matching ``evaluate``'s, a refusal
before any fit when the budget is impossible, and a reconstruction giving the same losses from a
disk cache as from memory."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from packptq.artifacts import RunDir
from packptq.calibration import calibrate_twins
from packptq.config import ConfigError, typed
from packptq.context import RunContext
from packptq.evaluate import capture, forward_all
from packptq.quant import QuantConfig, QuantLayer
from packptq.recon import ReconSequence, plan_units
from packptq.recon import sequence as seq_mod
from packptq.recon.cache import (IN_FLIGHT, MODES, ActivationCache, CachePlan, FileStore, MemStore, capture_batch,
                                 capture_into, choose_modes, forward_into, human, parse_bytes)
from packptq.recon.unit import ReconConfig, UnitRun, reconstruct_unit
from packptq.zoo.build import ModelConfig, build_model

from conftest import compose_cfg

CPU = torch.device("cpu")
TRAINER = {"accelerator": "cpu"}


# -- the budget -----------------------------------------------------------------------------
@pytest.mark.parametrize("value,expected", [
    (None, None), ("null", None), (4096, 4096), (1.5e9, 1_500_000_000), ("4GB", 4 * 10 ** 9),
    ("512MB", 512 * 10 ** 6), ("512 mb", 512 * 10 ** 6), ("1.5GiB", 3 * 2 ** 29), ("64KiB", 65536),
    ("1000", 1000), ("2e3B", 2000),
])
def test_budget_parser_reads_numbers_and_units(value, expected):
    assert parse_bytes(value) == expected


@pytest.mark.parametrize("value", ["4 parsecs", "GB", "-1GB", "0", 0, "0.5", True, "1.2.3MB"])
def test_budget_parser_refuses_what_is_not_a_byte_count(value):
    with pytest.raises(ConfigError, match="cache_budget"):
        parse_bytes(value)


def test_recon_config_validates_cache_settings_from_the_command_line():
    cfg = compose_cfg(["recon.cache_budget=4GB", "recon.cache_mode=disk"])
    r = typed(ReconConfig, cfg.recon, "recon")
    assert (r.cache_mode, parse_bytes(r.cache_budget)) == ("disk", 4 * 10 ** 9)
    r = typed(ReconConfig, compose_cfg(["recon.cache_budget=1000000"]).recon, "recon")
    assert parse_bytes(r.cache_budget) == 10 ** 6
    assert typed(ReconConfig, compose_cfg([]).recon, "recon").cache_budget is None
    with pytest.raises(ConfigError, match="cache_mode=ram"):
        ReconConfig(cache_mode="ram")
    with pytest.raises(ConfigError, match="cache_budget"):
        ReconConfig(cache_budget="lots")


# -- choosing a mode ------------------------------------------------------------------------
def plan(n=256, q=1000, fo=1000) -> CachePlan:
    return CachePlan("pack_00", n, q, q, fo, q)


def test_mode_footprints():
    p = plan()
    assert p.memory("keep", 32) == 4 * 256 * 3000
    assert p.memory("half", 32) == 2 * 256 * 3000
    assert p.memory("disk", 32) == 4 * IN_FLIGHT * 32 * 3000 and p.disk("disk") == 4 * 256 * 3000
    assert p.memory("recompute", 32) == 4 * 256 * 2000  # q_in and the FP input
    assert p.disk("keep") == p.disk("half") == p.disk("recompute") == 0


def test_auto_takes_the_first_mode_in_cost_order_that_fits_the_budget():
    p = plan()
    mem = {m: p.memory(m, 32) for m in MODES}
    assert choose_modes([plan()], "auto", None, 32)[0].mode == MODES[0]
    for budget in sorted(mem.values()):
        chosen = choose_modes([plan()], "auto", budget, 32)[0].mode
        assert chosen == next(m for m in MODES if mem[m] <= budget)
        assert mem[chosen] <= budget
    # just under the float32 size: not keep
    assert choose_modes([plan()], "auto", mem["keep"] - 1, 32)[0].mode != "keep"
    # without the disk space for its file, disk is passed over
    smallest = min(mem.values())
    assert smallest == mem["disk"]
    with pytest.raises(ConfigError, match="pack_00"):
        choose_modes([plan()], "auto", smallest, 32, disk_free=mem["keep"] - 1)
    assert choose_modes([plan()], "auto", smallest, 32, disk_free=mem["keep"])[0].mode == "disk"
    # the exact modes first: under the float32 size a file, without disk space float16, then recompute
    assert choose_modes([plan()], "auto", mem["keep"] - 1, 32)[0].mode == "disk"
    wide = plan(fo=4000)  # a wide output: recomputing it needs less memory than float16
    half, rec = wide.memory("half", 32), wide.memory("recompute", 32)
    assert rec < half
    assert choose_modes([plan(fo=4000)], "auto", half, 32, disk_free=0)[0].mode == "half"
    assert choose_modes([plan(fo=4000)], "auto", half - 1, 32, disk_free=0)[0].mode == "recompute"


def test_a_budget_no_mode_fits_is_refused_naming_the_unit_and_the_needs():
    with pytest.raises(ConfigError, match=r"pack_00 \(256 samples\).*keep 2\.9 MiB.*raise the budget"):
        choose_modes([plan()], "auto", 1000, 32)
    with pytest.raises(ConfigError, match="cache_mode=keep"):  # a fixed mode is held to the budget too
        choose_modes([plan()], "keep", 10 ** 6, 32)
    assert choose_modes([plan()], "half", 10 ** 6 * 2, 32)[0].mode == "half"


def test_memory_stores_go_on_the_device_only_when_it_holds_them_twice():
    keep = plan().memory("keep", 32)
    assert not choose_modes([plan()], "keep", None, 32, device_free=0)[0].on_device
    assert not choose_modes([plan()], "keep", None, 32, device_free=2 * keep - 1)[0].on_device
    assert choose_modes([plan()], "keep", None, 32, device_free=2 * keep)[0].on_device
    assert not choose_modes([plan()], "disk", None, 32, device_free=10 ** 12)[0].on_device


# -- the stores serve the keep cache's batches -------------------------------------------------
def fp_part() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(4, 5, 1)).eval()


def draws(cache: ActivationCache, k: int = 6, bs: int = 8):
    it = cache.batches(bs, torch.Generator().manual_seed(3))
    return [next(it) for _ in range(k)]


def test_every_mode_serves_the_batches_of_the_float32_cache(tmp_path):
    f = fp_part()
    torch.manual_seed(1)
    x = torch.randn(40, 3, 6, 6)
    q = x + 0.01 * torch.randn_like(x)
    with torch.no_grad():
        y = f(x)
    keep = draws(ActivationCache(q, x, y))
    src = MemStore.of(x)
    disk = ActivationCache(*(forward_into(lambda h: h, MemStore.of(t), 16, CPU,
                                          lambda s, k=k: FileStore(tmp_path / f"{k}.f32", 40, s))
                             for k, t in enumerate((q, x, y))))
    assert disk.nbytes() == 0 and disk.disk_bytes() == 40 * 4 * (108 + 108 + 180)
    half = ActivationCache(q, x, y, dtype="float16")
    recompute = ActivationCache(q, src, fp_fn=lambda s: (s, f(s)))
    assert recompute.nbytes() == 2 * x.numel() * 4
    for mode, cache, check in (("disk", disk, torch.equal),
                               ("recompute", recompute, lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-6)),
                               ("half", half, lambda a, b: torch.allclose(a, b, rtol=1e-3, atol=1e-3))):
        got = draws(cache)
        for b_keep, b in zip(keep, got):
            assert all(t.dtype == torch.float32 and t.shape == u.shape for t, u in zip(b, b_keep)), mode
            assert all(check(t, u) for t, u in zip(b, b_keep)), mode
    with pytest.raises(ValueError, match="exactly one of fp_out and fp_fn"):
        ActivationCache(q, x, y, fp_fn=lambda s: (s, f(s)))


def test_file_store_round_trip_and_removal(tmp_path):
    t = torch.randn(10, 3, 2)
    s = FileStore(tmp_path / "a.f32", 10, (3, 2))
    s.write(0, t[:4])
    s.write(4, t[4:])
    assert torch.equal(s.slice(2, 7), t[2:7])
    idx = torch.tensor([9, 0, 0, 5])
    assert torch.equal(s.rows(idx, CPU), t[idx])
    assert (tmp_path / "a.f32").stat().st_size == t.numel() * 4
    del s
    assert not (tmp_path / "a.f32").exists()


def test_builders_equal_evaluate_and_write_the_store_dtype():
    f = fp_part()
    x = torch.randn(37, 3, 6, 6)
    src = MemStore.of(x)
    out = forward_into(f, src, 8, CPU, lambda s: MemStore(37, s, torch.float32, CPU))
    assert torch.equal(out.t, forward_all(f, x, 8, CPU))
    # the conv output is altered in place by the ReLU after it: the hook copies it first
    ins, outs = capture_into(f, src, f[0], 8, CPU, lambda s: MemStore(37, s, torch.float32, CPU))
    ref_in, ref_out = capture(f, x, f[0], 8, CPU)
    assert torch.equal(ins.t, ref_in) and torch.equal(outs.t, ref_out) and (outs.t < 0).any()
    half_in, none = capture_into(f, src, f[0], 8, CPU, lambda s: MemStore(37, s, torch.float16, CPU), outputs=False)
    assert none is None and half_in.t.dtype == torch.float16 and torch.equal(half_in.t, ref_in.half())
    b_in, b_out = capture_batch(f, f[0], x[:8])
    assert torch.allclose(b_out, ref_out[:8], atol=1e-6) and (b_out < 0).any()


def test_unit_reconstruction_from_a_disk_cache_gives_the_losses_of_memory(tmp_path):
    torch.manual_seed(0)
    layer = QuantLayer(nn.Linear(8, 4), w_bits=3, a_bits=4)
    layer.aq.init_from(torch.randn(1000) * 2)
    x = torch.randn(64, 8)
    q_in = x + 0.05 * torch.randn_like(x)
    with torch.no_grad():
        y = layer.layer(x)
    cfg = ReconConfig(iters=12, batch_size=16, log_every=1000)
    losses = []
    for disk in (False, True):
        unit = copy.deepcopy(layer)
        tensors = (q_in, x, y)
        if disk:
            tensors = [forward_into(lambda h: h, MemStore.of(t), 16, CPU,
                                    lambda s, k=k: FileStore(tmp_path / f"{k}.f32", 64, s)) for k, t in enumerate(tensors)]
        losses.append(reconstruct_unit(unit, ActivationCache(*tensors), cfg, UnitRun("layer_00", seed=5, trainer_kwargs=TRAINER)))
    assert len(losses[0]) == 12 and losses[0] == losses[1]


# -- the sequence ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def twins_setup():
    """Twins of a small random resnet18 (8..64 channels, 16x16 one-channel images), W4A4."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="resnet18", kwargs={"channels": [8, 16, 32, 64]}),
                        {"num_classes": 10, "in_chans": 1, "img_size": 16})
    x = torch.randn(48, 1, 16, 16)
    twins = calibrate_twins(model, "resnet", QuantConfig(w_bits=4, a_bits=4), x, 0, 16, CPU)
    return twins, x


def sequence(twins_setup, tmp_path, kind="packs", **recon) -> ReconSequence:
    twins = copy.deepcopy(twins_setup[0])
    units = plan_units(kind, [[0, 1, 2, 3], [4, 5, 6, 7]], twins)
    cfg = ReconConfig(iters=3, batch_size=8, log_every=1000, **recon)
    return ReconSequence(RunContext(RunDir(tmp_path), CPU, TRAINER, seed=0, batch_size=16), twins, units, cfg)


def run_sequence(twins_setup, tmp_path, kind="packs", **recon):
    seq = sequence(twins_setup, tmp_path, kind, **recon)
    return seq.run(twins_setup[1]), seq


def test_sequence_gives_the_same_losses_from_a_disk_cache(twins_setup, tmp_path, packptq_log):
    keep, _ = run_sequence(twins_setup, tmp_path / "keep", cache_mode="keep")
    disk, seq = run_sequence(twins_setup, tmp_path / "disk", cache_mode="disk")
    assert keep == disk and len(keep) == 4 and all(len(v) == 3 for v in keep.values())
    assert [p.mode for p in seq.plans] == ["disk"] * 4
    assert not (tmp_path / "disk" / seq_mod.CACHE_DIR).exists()  # files removed as units finish
    out = packptq_log.text
    assert "recon.cache_mode=disk" in out and "pack_01" in out


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["packs", "layers"])
def test_sequence_losses_agree_across_every_mode(twins_setup, tmp_path, kind):
    keep, _ = run_sequence(twins_setup, tmp_path / "keep", kind, cache_mode="keep")
    disk, _ = run_sequence(twins_setup, tmp_path / "disk", kind, cache_mode="disk")
    assert keep == disk
    # recompute: the FP side of each batch computed again (float rounding of another batch size)
    rec, _ = run_sequence(twins_setup, tmp_path / "rec", kind, cache_mode="recompute")
    assert rec.keys() == keep.keys()
    for k in keep:
        assert rec[k] == pytest.approx(keep[k], rel=1e-4, abs=1e-7), k


def test_an_impossible_budget_is_refused_before_any_unit_is_fitted(twins_setup, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a unit was fitted before the budget was checked")

    monkeypatch.setattr(seq_mod, "reconstruct_unit", boom)
    with pytest.raises(ConfigError, match=r"activation cache of unit prefix_00 \(48 samples\).*cache_budget=1000 B"):
        run_sequence(twins_setup, tmp_path, cache_budget="1kB")
    assert not any(tmp_path.iterdir())  # nothing written


def test_auto_moves_only_the_units_over_the_budget_to_a_cheaper_mode(twins_setup, tmp_path, packptq_log):
    plans = sequence(twins_setup, tmp_path / "a").plan_cache(twins_setup[1])
    assert all(p.mode == "keep" for p in plans)  # no budget: everything in float32 memory
    keep = {p.key: p.memory("keep", 8) for p in plans}
    budget = sorted(set(keep.values()))[-2]  # the largest unit no longer fits in float32
    plans = sequence(twins_setup, tmp_path / "b", cache_budget=str(budget)).plan_cache(twins_setup[1])
    assert [p.key for p in plans] == list(keep)
    for p in plans:
        assert p.mode == "keep" if keep[p.key] <= budget else p.mode != "keep", p
        assert p.memory(p.mode, 8) <= budget
    out = packptq_log.text
    largest = max(keep, key=keep.get)
    assert f"recon.cache_budget={human(budget)}" in out
    assert [line for line in out.splitlines() if line.strip().startswith(largest)][-1].split()[1] == \
        plans[[p.key for p in plans].index(largest)].mode


def test_a_budget_no_pack_can_fit_stops_the_run_before_fp_training(tmp_path, no_heavy_compute):
    from packptq import pipeline

    from conftest import tiny_cfg

    with pytest.raises(ConfigError, match=r"unit pack_00 \(64 samples\).*cache_budget=1000 B"):
        pipeline.run(tiny_cfg(tmp_path / "run", "packing=block", "recon.cache_budget=1kB"))
    with pytest.raises(ConfigError, match=r"unit pack_00 .*cache_mode=keep"):
        pipeline.run(tiny_cfg(tmp_path / "run2", "packing=block", "recon.cache_budget=50kB", "recon.cache_mode=keep"))
