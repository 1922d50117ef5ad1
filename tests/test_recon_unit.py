"""Reconstruction of one unit under Lightning: the loss falls on a real block of a trained
model, the reconstructed block beats round-to-nearest, QDrop mixes inputs as configured, the
AdaRound regulariser follows its schedule, the cache can be half precision, and every unit's
losses of a whole pipeline run reach the logger with increasing steps."""
from __future__ import annotations

import copy

import pytest
import torch
from lightning.pytorch.loggers import Logger
from torch import nn

from packptq.quant import QuantConfig, QuantLayer, WeightQuantizer, calibrate, fold_bn, quantize_model
from packptq.recon.unit import ActivationCache, ReconConfig, UnitReconstruction, UnitRun, reconstruct_unit, rec_loss
from packptq.zoo import split_model

from conftest import tiny_cfg

TRAINER = {"accelerator": "cpu"}


class MemoryLogger(Logger):
    """Keeps every (step, metrics) it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics, step=None) -> None:
        self.records.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


@torch.no_grad()
def block_setup(trained_tiny, w_bits: int, a_bits: int, block: int = 2):
    """The FP (BN-folded) and RTN-quantized block ``block`` of the trained tiny resnet18, and
    its (quantized input, FP input, FP output) on the calibration set and on test images."""
    model, dm, _ = trained_tiny
    x, _ = dm.calib_tensors()
    x_test = next(iter(dm.test_dataloader()))[0][:128]
    fp = copy.deepcopy(model).eval()
    fold_bn(fp)
    q = quantize_model(copy.deepcopy(model), QuantConfig(w_bits=w_bits, a_bits=a_bits), x[:2])
    torch.manual_seed(0)  # calibration subsamples activations at random
    calibrate(q, x)
    fs, qs = split_model(fp, "resnet"), split_model(q, "resnet")

    def io(inp):
        hf, hq = fs.prefix(inp), qs.prefix(inp)
        for b in range(block):
            hf, hq = fs.blocks[b][1](hf), qs.blocks[b][1](hq)
        return hq, hf, fs.blocks[block][1](hf)

    return qs.blocks[block][1], io(x), io(x_test)


@torch.no_grad()
def block_err(unit: nn.Module, data) -> float:
    q_in, _, fp_out = data
    unit.eval()
    return float(rec_loss(unit(q_in), fp_out, 1))


@pytest.mark.slow
@pytest.mark.parametrize("w_bits,a_bits", [(3, 3), (2, 4)])
def test_block_loss_falls_and_beats_rtn(trained_tiny, w_bits, a_bits):
    unit, calib, test = block_setup(trained_tiny, w_bits, a_bits)
    rtn_calib, rtn_test = block_err(unit, calib), block_err(unit, test)
    cfg = ReconConfig(iters=200, batch_size=32, log_every=1000)
    losses = reconstruct_unit(unit, ActivationCache(*calib), cfg, UnitRun("pack_00", seed=0, trainer_kwargs=TRAINER))
    assert len(losses) == 200
    k = len(losses) // 10
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    assert last < first, (first, last)
    # after reconstruction (frozen: hard rounding, weights on the grid) the block is closer to
    # FP than round-to-nearest, on the calibration set and on held-out images
    wqs = [m for m in unit.modules() if isinstance(m, WeightQuantizer)]
    assert wqs and all(m.mode == "hard" for m in wqs)
    after_calib, after_test = block_err(unit, calib), block_err(unit, test)
    assert after_calib < rtn_calib, (rtn_calib, after_calib)
    assert after_test < rtn_test, (rtn_test, after_test)


@pytest.mark.slow
def test_reconstruction_is_deterministic_per_seed(trained_tiny):
    outs = []
    for seed in (0, 0, 1):
        unit, calib, _ = block_setup(trained_tiny, 3, 3, block=1)
        reconstruct_unit(unit, ActivationCache(*calib), ReconConfig(iters=15, log_every=1000),
                         UnitRun("u", seed, trainer_kwargs=TRAINER))
        outs.append({k: v.clone() for k, v in unit.state_dict().items()})
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
    assert any(not torch.equal(outs[0][k], outs[2][k]) for k in outs[0])


# ---------------------------------------------------------------------------------------------
# QDrop
# ---------------------------------------------------------------------------------------------
class Recorder(nn.Module):
    """A unit that records the inputs it is trained on and its activation quantizer's state."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = QuantLayer(nn.Linear(8, 4), w_bits=4, a_bits=4)
        self.layer.aq.init_from(torch.randn(1000) * 2)
        self.seen, self.aq_state = [], []

    def forward(self, x):
        if torch.is_grad_enabled():
            self.seen.append(x.detach().clone())
            self.aq_state.append((self.layer.aq.drop_prob, self.layer.aq.training))
        return self.layer(x)


def sign_cache(n: int = 64) -> ActivationCache:
    # quantized inputs are all +1, FP inputs all -1: every element tells where it came from
    return ActivationCache(torch.ones(n, 8), -torch.ones(n, 8), torch.zeros(n, 4))


@pytest.mark.parametrize("drop_prob", [1.0, 0.5, 0.0])
def test_qdrop_mixes_quantized_and_fp_inputs(drop_prob):
    unit = Recorder()
    cfg = ReconConfig(iters=30, batch_size=16, drop_prob=drop_prob, log_every=1000)
    reconstruct_unit(unit, sign_cache(), cfg, UnitRun("layer_00", seed=0, trainer_kwargs=TRAINER))
    seen = torch.cat(unit.seen)
    assert len(unit.seen) == 30 and seen.abs().eq(1).all()
    frac_q = float((seen > 0).float().mean())
    if drop_prob in (0.0, 1.0):
        assert frac_q == drop_prob  # 1.0: purely the quantized input; 0.0: purely FP
    else:
        assert abs(frac_q - drop_prob) < 0.05
        # element-wise, not per sample: samples mix both sources
        per_sample = (torch.cat(unit.seen) > 0).float().mean(1)
        assert ((per_sample > 0) & (per_sample < 1)).float().mean() > 0.9
    # without drop_inside the unit's own quantizers never drop
    assert all(p == 0.0 for p, _ in unit.aq_state)
    assert unit.layer.aq.drop_prob == 0.0


def test_qdrop_inside_sets_the_unit_quantizers_then_freezes():
    unit = Recorder()
    cfg = ReconConfig(iters=10, batch_size=8, drop_prob=0.7, drop_inside=True, log_every=1000)
    reconstruct_unit(unit, sign_cache(), cfg, UnitRun("layer_00", seed=0, trainer_kwargs=TRAINER))
    # inside the unit each element keeps its FP value with probability 1 - drop_prob
    assert all(p == pytest.approx(0.3) and t for p, t in unit.aq_state)
    assert unit.layer.aq.drop_prob == 0.0 and not unit.layer.aq.training  # frozen afterwards
    assert unit.layer.wq.mode == "hard"


# ---------------------------------------------------------------------------------------------
# AdaRound regulariser and optimisers
# ---------------------------------------------------------------------------------------------
def test_regulariser_schedule():
    cfg = ReconConfig(iters=100, warmup=0.2, beta_start=20.0, beta_end=2.0)
    mod = UnitReconstruction(QuantLayer(nn.Linear(4, 3), 4, 4), cfg, "layer_00")
    assert all(mod.beta(s) is None for s in range(20))
    betas = [mod.beta(s) for s in range(20, 101)]
    assert betas[0] == pytest.approx(20.0) and betas[-1] == pytest.approx(2.0)
    steps = [b - a for a, b in zip(betas, betas[1:])]
    assert all(d == pytest.approx(steps[0]) for d in steps) and steps[0] < 0  # linear, falling
    assert mod.beta(60) == pytest.approx(11.0)


def test_regulariser_enters_the_loss_only_after_warmup():
    unit = Recorder()
    log = MemoryLogger()
    cfg = ReconConfig(iters=20, batch_size=8, warmup=0.5, log_every=1, reg_lambda=1.0)
    reconstruct_unit(unit, sign_cache(), cfg, UnitRun("layer_00", seed=0, trainer_kwargs=TRAINER, logger=log))
    rows = sorted((s, m) for s, m in log.records if "recon/layer_00/loss" in m)
    assert [s for s, _ in rows] == list(range(20))
    for s, m in rows:
        rec, total = m["recon/layer_00/loss"], m["recon/layer_00/total"]
        if s < 10:
            assert total == pytest.approx(rec)
        else:
            assert total > rec  # lambda * sum(1 - |2h - 1|^beta) > 0 while h is not 0/1


def test_round_reg_pushes_towards_zero_or_one():
    wq = WeightQuantizer(torch.randn(5, 7), 4)
    wq.init_adaround(torch.randn(5, 7))
    with torch.no_grad():
        wq.alpha.fill_(0.0)  # h = 0.5: the largest penalty
        mid = float(wq.round_reg(2.0))
        wq.alpha.fill_(50.0)  # h = 1
        assert float(wq.round_reg(2.0)) == pytest.approx(0.0, abs=1e-6)
    assert mid == pytest.approx(35.0)


def _lrs_after(cfg: ReconConfig, steps: int):
    unit = QuantLayer(nn.Linear(4, 3), 4, 4)
    unit.aq.init_from(torch.randn(100))
    mod = UnitReconstruction(unit, cfg, "layer_00")
    conf = mod.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    for _ in range(steps):
        opt.step()
        sched.step()
    return [g["lr"] for g in opt.param_groups]


def test_activation_lr_is_cosine_to_zero():
    cfg = ReconConfig(iters=40)
    assert _lrs_after(cfg, 0)[1] == pytest.approx(cfg.a_lr)
    assert _lrs_after(cfg, 20)[1] == pytest.approx(cfg.a_lr / 2)
    assert _lrs_after(cfg, 40)[1] == pytest.approx(0.0, abs=1e-12)


def test_adaround_lr_is_constant():
    cfg = ReconConfig(iters=40)
    assert _lrs_after(cfg, 20)[0] == pytest.approx(cfg.w_lr)
    assert _lrs_after(cfg, 40)[0] == pytest.approx(cfg.w_lr)


# ---------------------------------------------------------------------------------------------
# cache and loss
# ---------------------------------------------------------------------------------------------
def test_float16_cache_halves_memory_and_serves_float32():
    t = [torch.randn(50, 4, 6, 6) for _ in range(3)]
    c32, c16 = ActivationCache(*t), ActivationCache(*t, dtype="float16")
    assert c16.nbytes() * 2 == c32.nbytes() == 3 * 50 * 144 * 4
    b = next(c16.batches(8, torch.Generator().manual_seed(0)))
    assert len(b) == 3 and all(x.dtype == torch.float32 and x.shape == (8, 4, 6, 6) for x in b)
    # same generator, same rows; values within half precision
    b32 = next(c32.batches(8, torch.Generator().manual_seed(0)))
    assert all(torch.allclose(x, y, rtol=1e-3, atol=1e-3) for x, y in zip(b, b32))
    with pytest.raises(ValueError, match="disagree in length"):
        ActivationCache(t[0], t[1][:10], t[2])


def test_rec_loss_sums_channels_and_averages_the_rest():
    out = torch.zeros(2, 3, 4)
    target = torch.ones(2, 3, 4)
    target[0, :, 0] = 3.0  # one position of one sample: error 9 in each of 3 channels
    # channels on dim 1: per (sample, position) sums over 3 channels, mean over 2*4 of them
    assert float(rec_loss(out, target, 1)) == pytest.approx((3 * 9 + 7 * 3) / 8)
    # channels last (tokens): sums over 4, mean over 2*3
    assert float(rec_loss(out, target, -1)) == pytest.approx((3 * (9 + 3) + 3 * 4) / 6)


def test_units_without_parameters_are_frozen_without_training():
    unit = QuantLayer(nn.Linear(4, 3), 4, 4)
    unit.wq.enabled = False  # nothing to learn: weights off, act quantizer not calibrated
    cache = ActivationCache(torch.randn(8, 4), torch.randn(8, 4), torch.randn(8, 3))
    assert reconstruct_unit(unit, cache, ReconConfig(iters=5), UnitRun("u", 0, trainer_kwargs=TRAINER)) == []
    assert reconstruct_unit(QuantLayer(nn.Linear(4, 3), 4, 4), cache, ReconConfig(iters=0), UnitRun("u", 0)) == []


# ---------------------------------------------------------------------------------------------
# logging through a whole pipeline run
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_every_unit_logs_its_loss_with_increasing_steps(tmp_path, trained_tiny):
    from packptq import pipeline

    log = MemoryLogger()
    cfg = tiny_cfg(tmp_path / "run", "packing=block", "recon.iters=12", "recon.log_every=4")
    res = pipeline.run(cfg, logger=log)
    keys = res["unit_keys"]
    assert keys[0] == "prefix_00" and keys[-1] == "suffix_00" and len(keys) == 10
    steps = {}
    for step, metrics in log.records:
        for k in metrics:
            if k.startswith("recon/") and k.endswith("/loss"):
                steps.setdefault(k.split("/")[1], []).append(step)
    assert sorted(steps) == sorted(keys)  # every unit reached the logger, nothing else did
    flat = [s for k in keys for s in steps[k]]
    assert all(b > a for a, b in zip(flat, flat[1:])), "steps must increase across units"
    for k in keys:
        assert len(steps[k]) == 4  # steps 0, 4, 8 and the last one (11)
    final = {k for _, m in log.records for k in m if k.startswith("eval/")}
    assert {"eval/fp_top1", "eval/quant_top1", "eval/rtn_top1", "eval/agreement"} <= final


@pytest.mark.parametrize("beta", [None, 12.0])
def test_fused_soft_rounding_equals_autograd_through_the_quantizers(beta):
    """UnitReconstruction's fused step (one autograd node per weight, values recomputed in
    backward) gives the output, regulariser and gradients of the plain module graph."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, padding=1)
    with torch.no_grad():
        conv.weight.mul_(3.0)  # weights beyond the grid's range: the clamp to [0, qmax] is exercised
    ql = QuantLayer(conv, w_bits=3, a_bits=8, w_method="minmax")
    with torch.no_grad():
        ql.wq.scale.mul_(0.7)
        ql.aq.q.scale.fill_(0.05)
        ql.aq.q.initialized.fill_(True)
    unit = nn.Sequential(ql, nn.ReLU())
    x = torch.randn(4, 6, 5, 5)
    cfg = ReconConfig(iters=10, learn_act=False)
    module = UnitReconstruction(unit, cfg, "u")
    alpha = ql.wq.alpha
    with torch.no_grad():
        alpha.add_(torch.randn_like(alpha) * 3)  # some h clamped at 0 or 1
    out, reg = module._forward(x, beta)
    loss = out.square().sum() + (reg if beta is not None else 0)
    (g_fused,) = torch.autograd.grad(loss, alpha)
    ref_out = unit(x)
    ref_loss = ref_out.square().sum() + (ql.wq.round_reg(beta) if beta is not None else 0)
    (g_ref,) = torch.autograd.grad(ref_loss, alpha)
    assert torch.equal(out, ref_out)
    if beta is not None:
        torch.testing.assert_close(reg, ql.wq.round_reg(beta), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(g_fused, g_ref, rtol=1e-5, atol=1e-6)
    assert (g_ref == 0).any() and (g_ref != 0).any()


def test_gradient_clipping_from_the_trainer_section_reaches_the_manual_step():
    """trainer.gradient_clip_val is applied by the unit's own step (Lightning refuses it under
    manual optimization): a tiny clip value changes the fit, and the run does not fail."""
    def fit(trainer_kwargs):
        torch.manual_seed(0)
        layer = nn.Linear(16, 8)
        ql = QuantLayer(layer, w_bits=3, a_bits=8, w_method="minmax")
        x = torch.randn(64, 16)
        with torch.no_grad():
            y = layer(x)
        cache = ActivationCache(x, x, y)
        kw = dict(accelerator="cpu", enable_progress_bar=False, **trainer_kwargs)
        return reconstruct_unit(ql, cache, ReconConfig(iters=20, learn_act=False, batch_size=16), UnitRun("u", 0, -1, kw))

    free = fit({})
    clipped = fit({"gradient_clip_val": 1e-6})
    assert len(clipped) == len(free) == 20
    assert clipped != free


def test_the_fit_leaves_nothing_alive_and_the_collector_as_it_was():
    """After reconstruct_unit the Lightning module, its trainer and the optimizer's state are
    gone (they refer to each other, so only a collection frees them); the objects frozen for
    that collection are thawed again, and a caller's own gc.freeze() is left in place."""
    import gc
    import weakref

    from lightning.pytorch.callbacks import Callback

    class Watch(Callback):
        refs: list = []

        def on_train_end(self, trainer, pl_module):
            state = [t for s in trainer.optimizers[0].state.values() for t in s.values() if torch.is_tensor(t)]
            assert state  # Adam's moments exist at the end of the fit
            self.refs[:] = [weakref.ref(o) for o in (trainer, pl_module, trainer.optimizers[0], *state)]

    watch = Watch()
    kw = {**TRAINER, "callbacks": [watch]}
    assert gc.get_freeze_count() == 0
    reconstruct_unit(Recorder(), sign_cache(), ReconConfig(iters=4, batch_size=16), UnitRun("layer_00", 0, trainer_kwargs=kw))
    assert len(watch.refs) > 3 and all(r() is None for r in watch.refs)
    assert gc.get_freeze_count() == 0
    gc.freeze()  # the caller's
    try:
        reconstruct_unit(Recorder(), sign_cache(), ReconConfig(iters=4, batch_size=16),
                         UnitRun("layer_00", 0, trainer_kwargs=kw))
        assert all(r() is None for r in watch.refs)
        assert gc.get_freeze_count() > 0  # not thawed by the unit
    finally:
        gc.unfreeze()
