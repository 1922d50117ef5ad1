"""profile=official: each switch it sets does what the official Pack-PTQ code does (read from
github VicLee-Worker/Pack-PTQ: quant/quant_module.py, utils/initialize.py,
quant/reconstruction.py, utils/other_utils.py), and profile=default keeps packptq's choices."""
from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from packptq.artifacts import RunDir
from packptq.context import RunContext
from packptq.calibration import calibrate_twins
from packptq.config import ConfigError, typed
from packptq.data import build_datamodule
from packptq.data.base import DataConfig
from packptq.packing import PackingConfig
from packptq.quant import QuantConfig, QuantLayer, calibrate, quantize_model, search_range
from packptq.quant.convert import act_quantizers
from packptq.quant.quantizer import RANGE_GRIDS, RANGE_NORM
from packptq.recon import ReconSequence, plan_units
from packptq.recon import sequence as seq_mod
from packptq.recon.unit import ReconConfig, UnitReconstruction
from packptq.zoo.build import ModelConfig, build_model

from conftest import compose_cfg
from test_recon_cache import twins_setup  # noqa: F401  (the fixture: twins of a small resnet18)

CPU = torch.device("cpu")
TRAINER = {"accelerator": "cpu"}

#: every switch of the official profile: (section, key) -> (packptq's value, the official code's)
SWITCHES = {
    ("packing", "loss"): ("kl", "official"),
    ("quant", "first_last_bits"): (8, None),
    ("quant", "range_grid"): ("full", "official"),
    ("quant", "act_init"): ("fp_all", "quantized_batch"),
    ("quant", "attn_prob"): ("uniform", "uniform"),
    ("quant", "ln_reparam"): (False, False),
    ("recon", "batch_size"): (32, 16),
    ("recon", "drop_units"): ("all", "packs"),
    ("recon", "loss_reduction"): ("channel", "axis1"),
    ("data", "calib_transform"): ("eval", "train"),
}
SCHEMAS = {"packing": PackingConfig, "quant": QuantConfig, "recon": ReconConfig, "data": DataConfig}


# -- the profiles -----------------------------------------------------------------------------
@pytest.mark.parametrize("profile", ["default", "official"])
def test_profile_sets_each_switch(profile, tmp_path):
    cfg = compose_cfg([f"run_dir={tmp_path}", f"profile={profile}"])
    col = 0 if profile == "default" else 1
    for (section, key), values in SWITCHES.items():
        # a key the profile leaves unset takes its schema default
        value = OmegaConf.select(cfg, f"{section}.{key}", default=getattr(SCHEMAS[section](), key))
        assert value == values[col], (section, key)
        if profile == "default":  # packptq's value is the schema default: nothing changes behaviour
            assert getattr(SCHEMAS[section](), key) == values[0], (section, key)
    # the one-batch init uses recon.batch_size images, also when the batch is set on the command line
    assert typed(QuantConfig, cfg.quant, "quant").act_init_batch == cfg.recon.batch_size
    if profile == "official":
        cfg = compose_cfg([f"run_dir={tmp_path}", "profile=official", "recon.batch_size=8"])
        assert typed(QuantConfig, cfg.quant, "quant").act_init_batch == 8


@pytest.mark.parametrize("name,mp", [("paper_cnn", "none"), ("paper_vit", "none"), ("paper_pointnet", "none"),
                                     ("paper_cnn_mp", "official"), ("paper_vit_mp", "official")])
def test_paper_presets_use_the_official_profile(name, mp, tmp_path, monkeypatch):
    monkeypatch.setenv("IMAGENET_DIR", str(tmp_path))
    monkeypatch.setenv("MODELNET40_DIR", str(tmp_path))
    cfg = compose_cfg([f"run_dir={tmp_path}", f"experiment={name}"], return_hydra_config=True)
    assert cfg.hydra.runtime.choices.profile == "official" and cfg.mp.policy == mp
    assert cfg.recon.batch_size == 16 and cfg.packing.loss == "official" and cfg.quant.first_last_bits is None
    # ViTs: uniform softmax, no LayerNorm fold (the official code's log flag is ignored)
    assert cfg.quant.attn_prob == "uniform" and cfg.quant.ln_reparam is False
    # point clouds have no augmentation of the official code's to follow
    assert cfg.data.calib_transform == ("eval" if name == "paper_pointnet" else "train")


@pytest.mark.parametrize("section,key,value", [("quant", "range_grid", "fine"), ("quant", "act_init", "fp"),
                                               ("quant", "act_init_batch", 0), ("recon", "drop_units", "blocks"),
                                               ("recon", "loss_reduction", "sum"), ("data", "calib_transform", "aug")])
def test_unknown_switch_values_are_one_line_errors(section, key, value, tmp_path):
    cfg = compose_cfg([f"run_dir={tmp_path}", f"{section}.{key}={value}"])
    with pytest.raises(ConfigError, match=f"{section}.{key}") as exc:
        build_datamodule(cfg.data) if section == "data" else typed(SCHEMAS[section], cfg[section], section)
    assert "\n" not in str(exc.value)


# -- weight and activation range search ---------------------------------------------------------------
def test_range_grids():
    official = RANGE_GRIDS["official"]
    assert len(official) == 80 and official[0] == 1.0 and official[-1] == pytest.approx(0.21)
    assert all(a - b == pytest.approx(0.01) for a, b in zip(official, official[1:]))
    full = RANGE_GRIDS["full"]
    assert len(full) == 80 and full[0] == 1.0 and full[-1] == pytest.approx(1 / 80)


def official_mse_range(x: torch.Tensor, bits: int):
    """The official code's per-channel search (Uniform_Affine_Quantizer._init_mse_method_parallel):
    ratios s = 1 - 0.01 i for i < 80 of the raw min and max, score mean |x - q(x)|^2.4, the
    first strictly best ratio kept."""
    n = 2 ** bits - 1
    best = torch.full((x.shape[0],), float("inf"))
    best_d, best_z = torch.empty(x.shape[0]), torch.empty(x.shape[0])
    for i in range(80):
        s = 1.0 - i * 0.01
        hi, lo = x.max(1).values * s, x.min(1).values * s
        d = (hi - lo) / n
        z = torch.round(-lo / d)
        q = (torch.clamp(torch.round(x / d[:, None]) + z[:, None], 0, n) - z[:, None]) * d[:, None]
        score = (x - q).abs().pow(2.4).mean(1)
        better = score < best
        best, best_d, best_z = torch.where(better, score, best), torch.where(better, d, best_d), \
            torch.where(better, z, best_z)
    return best_d, best_z


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_official_grid_picks_the_official_codes_weight_range(bits):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(16, 50, generator=g) * torch.rand(16, 1, generator=g)
    w[:4, 0] = 6.0  # outliers in some channels: the clipping ratio matters there
    assert RANGE_NORM == 2.4
    s, z = search_range(w, bits, ch_axis=0, grid="official")
    ref_s, ref_z = official_mse_range(w, bits)
    assert torch.allclose(s, ref_s, rtol=1e-6) and torch.equal(z, ref_z)


def test_the_official_grid_cannot_clip_below_a_fifth_of_the_range():
    # one huge outlier among small values: the best clip is far below 0.21 of the range, which
    # only the full grid reaches
    torch.manual_seed(0)
    x = torch.cat([torch.randn(20000) * 0.3, torch.tensor([10.0])])
    full_s, _ = search_range(x, 2, grid="full")
    off_s, _ = search_range(x, 2, grid="official")
    rng = float(x.max() - x.min()) / 3
    assert float(off_s) / rng == pytest.approx(0.21, abs=1e-4)
    assert float(full_s) / rng < 0.2


def test_quantize_model_puts_every_quantizer_on_the_configured_grid():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    for grid in ("full", "official"):
        q = quantize_model(copy.deepcopy(model), QuantConfig(w_bits=3, a_bits=3, range_grid=grid), torch.randn(2, 8))
        layer = q[2]
        assert layer.wq.grid == grid and layer.aq.q.grid == grid
        s, _ = search_range(model[2].weight, 8, 0, grid=grid)  # first/last at 8 bits by default
        assert torch.equal(layer.wq.scale, s)


# -- first and last layer ----------------------------------------------------------------------------
def test_first_and_last_layer_at_the_runs_bits(tmp_path):
    cfg = compose_cfg([f"run_dir={tmp_path}", "profile=official", "quant=w3a3"])
    qcfg = typed(QuantConfig, cfg.quant, "quant")
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="resnet18", kwargs={"channels": [8, 16, 32, 64]}),
                        {"num_classes": 10, "in_chans": 1, "img_size": 16})
    q = quantize_model(model, qcfg, torch.randn(2, 1, 16, 16))
    first, last = (q.get_submodule(n) for n in q.packptq_first_last)
    for layer in (first, last):
        assert (layer.wq.bits, layer.aq.bits) == (3, 3)
    assert not first.act_enabled  # the image itself is not quantized (an Identity in the official code)


# -- activation initialisation ----------------------------------------------------------------------
def three_layers():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3))


def test_one_batch_init_fits_each_quantizer_to_already_quantized_inputs():
    """utils/initialize.py initialize_quantization_params: quant state on for weights and
    activations, the first calibration batch forwarded once; every quantizer initialises on its
    first call, so the third layer's quantizer sees the output of a quantized second layer."""
    model, x = three_layers(), torch.randn(40, 6) * 2
    cfg = QuantConfig(w_bits=4, a_bits=3, first_last_bits=None, range_grid="official", act_init="quantized_batch")
    q = quantize_model(copy.deepcopy(model), cfg, x[:2])
    calibrate(q, x, batch_size=8, init="quantized_batch", init_batch=10)
    l1, l2, l3 = q[0], q[2], q[4]
    with torch.no_grad():
        h1 = torch.relu(nn.functional.linear(x[:10], l1.qweight(), l1.layer.bias))  # first layer: input FP
        s2, z2 = search_range(h1, 3, grid="official")
        assert torch.equal(l2.aq.q.scale.data, s2) and torch.equal(l2.aq.q.zero_point, z2)
        h2 = torch.relu(l2(h1))  # through the quantizer just fitted, quantized weights
        s3, _ = search_range(h2, 3, grid="official")
        assert torch.equal(l3.aq.q.scale.data, s3)
        # the FP-activation pass over all inputs gives other ranges: inputs beyond the batch count
        s3_fp, _ = search_range(torch.relu(nn.functional.linear(h1, l2.qweight(), l2.layer.bias)), 3, grid="official")
        assert not torch.equal(s3, s3_fp)
    # only the first init_batch inputs enter
    x2 = x.clone()
    x2[10:] *= 100
    q2 = quantize_model(copy.deepcopy(model), cfg, x[:2])
    calibrate(q2, x2, batch_size=8, init="quantized_batch", init_batch=10)
    assert all(torch.equal(a.q.scale, b.q.scale) for (_, a), (_, b) in zip(act_quantizers(q), act_quantizers(q2)))
    # the number of elements per sample is known for bit accounting, as after the FP pass
    assert int(l3.aq.elems_per_sample) == 12


def test_default_init_observes_every_calibration_input_in_fp():
    model, x = three_layers(), torch.randn(40, 6) * 2
    cfg = QuantConfig(w_bits=4, a_bits=3, first_last_bits=None)
    q = quantize_model(copy.deepcopy(model), cfg, x[:2])
    calibrate(q, x, batch_size=8)
    x2 = x.clone()
    x2[10:] *= 100
    q2 = quantize_model(copy.deepcopy(model), cfg, x[:2])
    calibrate(q2, x2, batch_size=8)
    assert float(q2[4].aq.q.scale) > 10 * float(q[4].aq.q.scale)  # later batches count


def test_calibrate_twins_reads_the_init_from_the_quant_config():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="resnet18", kwargs={"channels": [8, 16, 32, 64]}),
                        {"num_classes": 10, "in_chans": 1, "img_size": 16})
    x = torch.randn(48, 1, 16, 16)
    cfgs = [QuantConfig(w_bits=4, a_bits=4, act_init="quantized_batch", act_init_batch=k) for k in (8, 8, 16)]
    x_far = torch.cat([x[:8], x[8:] * 50])
    scales = []
    for qcfg, xs in zip(cfgs, (x, x_far, x)):
        twins = calibrate_twins(model, "resnet", qcfg, xs, 0, 16, CPU)
        scales.append(torch.stack([m.q.scale.detach() for _, m in act_quantizers(twins.qmodel)]))
    assert torch.equal(scales[0], scales[1])  # images past the first 8 do not enter
    assert not torch.equal(scales[0], scales[2])


# -- QDrop placement ----------------------------------------------------------------------------
@pytest.mark.parametrize("drop_units", ["all", "packs"])
def test_qdrop_on_pack_inputs_only(drop_units, twins_setup, tmp_path, monkeypatch):  # noqa: F811
    """quant/reconstruction.py _prepare_batch_data: a pack's input mixes the quantized and FP
    inputs (input_prob 0.5); a single prefix/suffix module trains on its quantized input."""
    seen = {}

    def record(unit, cache, cfg, run, *args, **kwargs):
        seen[run.key] = (cfg.drop_prob, cfg.drop_inside)
        return []

    monkeypatch.setattr(seq_mod, "reconstruct_unit", record)
    twins, x = copy.deepcopy(twins_setup[0]), twins_setup[1]
    for kind in ("packs", "layers"):
        seen.clear()
        units = plan_units(kind, [[0, 1, 2, 3], [4, 5, 6, 7]], twins)
        cfg = ReconConfig(iters=1, batch_size=8, drop_units=drop_units, drop_inside=True, predict=False)
        ctx = RunContext(RunDir(tmp_path / kind / drop_units), torch.device("cpu"), TRAINER, seed=0, batch_size=16)
        ReconSequence(ctx, twins, units, cfg).run(x)
        assert set(seen) == {u.key for u in units}
        for key, (p, inside) in seen.items():
            mixes = drop_units == "all" or key.startswith("pack_")
            assert p == (0.5 if mixes else 1.0), key  # 1.0: the quantized input only
            assert inside


# -- the reconstruction loss ---------------------------------------------------------------------------
def loss_of(unit: nn.Module, reduction: str, q_in, target, channel_dim: int):
    cfg = ReconConfig(iters=1, adaround=False, learn_act=False, drop_prob=1.0, loss_reduction=reduction)
    module = UnitReconstruction(unit, cfg, "u", channel_dim=channel_dim)
    return module.step_loss((q_in, q_in, target), 0)[0]


def test_official_loss_sums_axis_one_tokens_of_a_vit_output():
    """quant/reconstruction.py lp_loss: (pred - tgt).abs().pow(2).sum(1).mean(). On a
    Linear unit's [B, T, C] output axis 1 holds tokens; packptq's default sums channels."""
    torch.manual_seed(0)
    unit = QuantLayer(nn.Linear(8, 5), 4, 4)
    x, target = torch.randn(3, 7, 8), torch.randn(3, 7, 5)
    with torch.no_grad():
        out = unit(x)
        official = (out - target).abs().pow(2).sum(1).mean()
        ours = (out - target).pow(2).sum(-1).mean()
        assert loss_of(unit, "axis1", x, target, -1) == pytest.approx(float(official), rel=1e-6)
        assert loss_of(unit, "channel", x, target, -1) == pytest.approx(float(ours), rel=1e-6)
    # sum(1).mean() divides the total by B * C, sum(-1).mean() by B * T
    assert float(official) / float(ours) == pytest.approx(7 / 5, rel=1e-5)


def test_loss_reductions_agree_on_conv_feature_maps():
    torch.manual_seed(0)
    unit = QuantLayer(nn.Conv2d(3, 4, 3, padding=1), 4, 4)
    x, target = torch.randn(2, 3, 5, 5), torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        assert loss_of(unit, "axis1", x, target, 1) == loss_of(unit, "channel", x, target, 1)


# -- the calibration transform ------------------------------------------------------------------------
def test_train_transform_augments_tensor_images_reproducibly():
    def calib(**kw):
        return build_datamodule({"name": "digits", "calib_size": 32, **kw}).calib_tensors()

    (x_eval, y_eval), (x_tr, y_tr) = calib(), calib(calib_transform="train")
    assert torch.equal(y_eval, y_tr) and x_tr.shape == x_eval.shape  # the same images, same size
    changed = (x_tr - x_eval).abs().flatten(1).amax(1) > 1e-3
    assert changed.float().mean() > 0.8  # cropped and flipped (an uncropped, unflipped draw is rare)
    assert torch.equal(x_tr, calib(calib_transform="train")[0])  # drawn with the calibration seed
    # the FP model and the evaluation are untouched: only calibration draws are augmented
    d = build_datamodule({"name": "digits", "calib_transform": "train"})
    d.setup()
    e = build_datamodule({"name": "digits"})
    e.setup()
    assert torch.equal(d.test_set.tensors[0], e.test_set.tensors[0])


def test_train_transform_is_part_of_the_calibration_fingerprint_only():
    from packptq import fp

    a = build_datamodule({"name": "digits"})
    b = build_datamodule({"name": "digits", "calib_transform": "train"})
    assert a.fingerprint() != b.fingerprint()
    mcfg = ModelConfig(name="resnet18")
    assert fp.cache_path(mcfg, a, ".") == fp.cache_path(mcfg, b, ".")  # one FP model serves both


def test_train_transform_of_image_folders_follows_the_model_data_config(tmp_path):
    import timm
    from torchvision import transforms

    from test_data import write_image_tree

    root = write_image_tree(tmp_path / "imgs")
    d = build_datamodule({"name": "imagefolder", "path": str(root), "img_size": 32, "calib_size": 6,
                          "calib_transform": "train"})
    model = timm.create_model("resnet18", num_classes=3)
    d.attach_model(model)
    t = d.train_transform().transforms
    assert [type(s) for s in t] == [transforms.RandomResizedCrop, transforms.RandomHorizontalFlip,
                                    transforms.ToTensor, transforms.Normalize]
    cfg = timm.data.resolve_model_data_config(model)
    # the crop's size is the data's input size (data.img_size=32 holds after the model is
    # attached, as for evaluation); mean and std are the model's
    assert t[0].size == (32, 32) and t[0].scale == (0.08, 1.0)
    assert tuple(t[3].mean) == tuple(cfg["mean"]) and tuple(t[3].std) == tuple(cfg["std"])
    x, _ = d.calib_tensors()
    assert x.shape == (6, 3, 32, 32) and torch.equal(x, d.calib_tensors()[0])
    ev = build_datamodule({"name": "imagefolder", "path": str(root), "img_size": 32, "calib_size": 6})
    ev.attach_model(model)
    assert not torch.equal(x, ev.calib_tensors()[0])
    assert d.train_set.transform is d.transform  # the split itself keeps the evaluation transform


def test_train_transform_refuses_point_clouds():
    d = build_datamodule({"name": "shapes", "calib_size": 8, "calib_transform": "train"})
    with pytest.raises(ConfigError, match="data.calib_transform=eval"):
        d.calib_tensors()


# -- a whole run ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_official_profile_runs_and_records_its_switches(tmp_path, trained_tiny):
    from packptq.pipeline import run

    from conftest import tiny_cfg

    res = run(tiny_cfg(tmp_path, "profile=official", "quant=w4a4", "recon.iters=10"))
    cfg = res["config"]
    for (section, key), (_, official) in SWITCHES.items():
        assert cfg[section][key] == official, (section, key)
    assert res["quant"]["first_last_bits"] is None and res["packing"]["loss"] == "official"
    assert res["quant_top1"] > 50 and res["rtn_top1"] > 10  # digits: chance is 10%


# -- the off-grid diagnostic (recon.eval_rounding=soft) ---------------------------------------------
def test_soft_rounding_is_the_official_codes_soft_weight_and_is_undone():
    """Inside ``soft_rounding`` a reconstructed weight is the official AdaRoundQuantizer's with
    soft targets on: clamp(floor(w/d) + h(V) + zp, 0, n-1), minus zp, times d, with
    h = clamp(sigmoid(V) * 1.2 - 0.1, 0, 1); outside it, the hard (on-grid) weight again."""
    from packptq.evaluate import soft_rounding
    from packptq.quant.quantizer import WeightQuantizer

    torch.manual_seed(0)
    w = torch.randn(6, 5)
    wq = WeightQuantizer(w, bits=2)
    wq.init_adaround(w)
    with torch.no_grad():
        wq.alpha.normal_(0, 2)
    wq.mode = "hard"
    holder = nn.Module()
    holder.wq = wq
    hard = wq(w)
    s, z = wq._sz(w)
    assert torch.allclose(hard / s + z, (hard / s + z).round(), atol=1e-4)  # on the grid
    with soft_rounding(holder) as n:
        soft = wq(w)
    h = torch.clamp(torch.sigmoid(wq.alpha) * 1.2 - 0.1, 0, 1)
    official = (torch.clamp(torch.floor(w / s) + h + z, 0, wq.qmax) - z) * s
    assert n == 1 and torch.allclose(soft, official, atol=1e-6)
    assert (soft / s + z - (soft / s + z).round()).abs().max() > 0.05  # off the grid
    assert wq.mode == "hard" and torch.equal(wq(w), hard)


@pytest.mark.slow
def test_offgrid_diagnostic_is_named_beside_the_unchanged_top1_and_survives_resume(tmp_path, trained_tiny):
    from packptq.pipeline import run

    from conftest import tiny_cfg

    base = ("packing=block", "quant=w2a4", "recon.iters=10")
    hard = run(tiny_cfg(tmp_path / "hard", *base))
    soft = run(tiny_cfg(tmp_path / "soft", *base, "recon.eval_rounding=soft"))
    assert "offgrid" not in hard and soft["offgrid"]["soft_quantizers"] > 0
    assert "not a quantized model" in " ".join(evaluate_table(soft))
    # the diagnostic changes no training and not the run's number: evaluated on the grid as ever
    assert soft["quant_top1"] == hard["quant_top1"] and soft["agreement"] == hard["agreement"]
    # resumed from its unit files, the soft run finds V itself again (not only its sign)
    again = run(tiny_cfg(tmp_path / "soft", *base, "recon.eval_rounding=soft"))
    assert again["offgrid"] == soft["offgrid"]
    # a hard run's unit files keep signs only: asking them for the diagnostic is refused
    with pytest.raises(ConfigError):
        run(tiny_cfg(tmp_path / "hard", *base, "recon.eval_rounding=soft"))


def evaluate_table(results: dict) -> list:
    from packptq.evaluate import table

    return table(results)


def test_eval_rounding_takes_hard_or_soft_only():
    assert ReconConfig().eval_rounding == "hard"
    with pytest.raises(ConfigError, match=r"recon.eval_rounding=nearest; use hard\|soft"):
        ReconConfig(eval_rounding="nearest")
