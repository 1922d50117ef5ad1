"""Exports: integer code packing, the pt checkpoint (``load_quantized`` reproduces the run's
quantized model exactly, without the run directory or the FP cache), ONNX with QDQ checked by
onnx.checker and run by onnxruntime, the refusal of the log-sqrt(2) quantizer, the
``packptq-export`` command (reads the unit files, refuses broken run directories with one line
and exit 2), and ``packptq.quantize`` on a model outside the zoo."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from torch import nn

from conftest import tiny_cfg

from packptq import export

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

#: model -> overrides on top of TINY: small enough for seconds per run
SMALL = {
    "resnet18": (),
    "mobilenetv2_100": ("~model.kwargs.channels", "model=mobilenetv2_100", "model.pretrained=false", "model.train_epochs=3",
                        "+model.kwargs.depth_multiplier=0.34",
                        "model.train_lr=4e-2"),
    "deit_tiny_patch16_224": ("~model.kwargs.channels", "model=deit_tiny_patch16_224", "model.patch_size=4", "+model.kwargs.depth=2",
                              "+model.kwargs.embed_dim=48", "+model.kwargs.num_heads=2", "model.train_epochs=2"),
    "pointnet": ("~model.kwargs.channels", "model=pointnet", "data=shapes", "data.calib_size=64", "data.n_train=300", "data.n_test=100",
                 "data.num_points=64", "model.kwargs.width=32", "+model.kwargs.point_widths=[8,8,16,16]",
                 "model.kwargs.head_widths=[32,16]", "model.train_epochs=10", "model.train_lr=5e-3",
                 "model.train_batch_size=16"),
}


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
def test_codes_pack_at_their_width_and_unpack_exactly(bits):
    torch.manual_seed(bits)
    codes = torch.randint(0, 2 ** bits, (7, 3, 3)).to(torch.uint8)  # 63 codes: a partial last byte
    packed = export.pack_codes(codes, bits)
    per = 8 // export.container_bits(bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-63 // per)
    assert torch.equal(export.unpack_codes(packed, bits, codes.shape), codes)


def _run_and_export(tmp_path, name, quant):
    from packptq import pipeline

    run_dir = tmp_path / "run"
    res = pipeline.run(tiny_cfg(run_dir, *SMALL[name], f"quant={quant}", "recon.iters=5", "threads=1",
                                "export=pt"))
    return run_dir, res


def _test_inputs(run_dir):
    from omegaconf import OmegaConf

    from packptq.data import build_datamodule

    cfg = OmegaConf.create(json.loads((run_dir / "results.json").read_text())["config"])
    dm = build_datamodule(cfg.data)
    dm.setup()
    xs, ys = zip(*dm.test_dataloader())
    return torch.cat(xs), torch.cat(ys)


def _round_trip(tmp_path, name, quant):
    """pt at the end of the run (export=pt) and ONNX through packptq.pipeline.export_run, both
    against the run's quantized model on its whole test set."""
    from omegaconf import OmegaConf

    from packptq import pipeline

    run_dir, res = _run_and_export(tmp_path, name, quant)
    assert res["export"]["agreement"] == 100.0 and res["export"]["max_abs_logit_diff"] == 0.0
    assert res["export"]["fp_bytes"] > res["export"]["bytes"] > 0
    cfg = OmegaConf.create(res["config"])
    qz = pipeline.quantized(cfg)  # the run read back from its directory
    x, y = _test_inputs(run_dir)
    with torch.no_grad():
        ref = qz.twins.qmodel.eval()(x)
    assert (ref.argmax(1) == y).float().mean().item() * 100 == pytest.approx(res["quant_top1"], abs=1e-4)
    ox = pipeline.export_run(qz, "onnx")
    model = onnx.load(ox["path"])
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert sum(i.data_type == onnx.TensorProto.UINT8 for i in model.graph.initializer) >= 2
    ort = export.onnx_predict(ox["path"], x)
    agree = (ort.argmax(1) == ref.argmax(1)).float().mean().item() * 100
    ort_top1 = (ort.argmax(1) == y).float().mean().item() * 100
    assert agree >= 99.5, (name, quant, agree)
    assert abs(ort_top1 - res["quant_top1"]) <= 0.2 + 1e-6
    # load_quantized without the run directory or the FP cache
    pt = tmp_path / "moved.pt"
    shutil.copy(run_dir / "quantized.pt", pt)
    shutil.rmtree(run_dir)
    cache = os.environ["PACKPTQ_CACHE"]
    os.environ["PACKPTQ_CACHE"] = str(tmp_path / "empty-cache")
    try:
        loaded = export.load_quantized(pt)
    finally:
        os.environ["PACKPTQ_CACHE"] = cache
    with torch.no_grad():
        assert torch.equal(loaded(x), ref)
    return ops


@pytest.mark.slow
def test_round_trip_resnet18_w4a4(tmp_path):
    ops = _round_trip(tmp_path, "resnet18", "w4a4")
    assert "Clip" in ops  # 4-bit activations: the uint8 range clamped


@pytest.mark.slow
@pytest.mark.parametrize("name,quant", [(m, q) for m in SMALL for q in ("w4a4", "w2a4")
                                        if (m, q) != ("resnet18", "w4a4")])
def test_round_trip(tmp_path, name, quant):
    _round_trip(tmp_path, name, quant)


def test_log2_softmax_quantizer_is_refused_for_onnx(tmp_path):
    import timm

    from packptq.quant import QuantConfig, calibrate, quantize_model

    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", num_classes=4, in_chans=1, img_size=8, patch_size=4,
                              depth=1, embed_dim=16, num_heads=2).eval()
    x = torch.randn(8, 1, 8, 8)
    quantize_model(model, QuantConfig(w_bits=4, a_bits=4, attn_prob="log2"), x[:2])
    calibrate(model, x)
    with pytest.raises(export.ExportError, match=r"log-sqrt\(2\).*attn_prob=uniform"):
        export.export_onnx(model, tmp_path / "m.onnx", x[:2])
    assert not (tmp_path / "m.onnx").exists()
    # the same model with the uniform softmax quantizer exports and runs in onnxruntime
    for m in model.modules():
        if hasattr(m, "p_quant"):
            m.p_quant.q.enabled = False
    path = export.export_onnx(model, tmp_path / "m.onnx", x[:2])
    with torch.no_grad():
        ref = model(x)
    diff = (export.onnx_predict(path, x) - ref).abs()
    # equal up to float rounding, except where an activation lies at a rounding boundary and one
    # 4-bit step flips downstream
    assert (diff < 1e-4).all(dim=1).float().mean() >= 0.5 and diff.max() < 0.02


def _export_cmd(capsys, *argv):
    """``packptq-export ARGV`` in-process: (exit status, stdout, stderr)."""
    from packptq.cli import export_main

    code = 0
    try:
        export_main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def _finished(tmp_path, results: dict):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "results.json").write_text(json.dumps(results))
    return run_dir


@pytest.mark.parametrize("fault,code,match", [
    ("no_run_dir", 2, "run not found"),
    ("no_results", 2, "results.json not found"),
    ("not_a_directory", 2, "is not a directory"),
    ("corrupt_results", 2, "is not valid JSON at line 1"),
    ("incomplete_results", 2, "lacks ['fingerprint', 'units', 'unit_keys', 'mp'] of a finished run"),
    ("out_is_directory", 2, "--out"),
    ("missing_unit", 2, "unit_00.pt not found"),
])
def test_export_command_faults_are_one_line(tmp_path, capsys, fault, code, match):
    """Bad input: exit 2, one line on stderr, no traceback, nothing written."""
    from conftest import compose_cfg
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(compose_cfg(["logger=none", "data=digits", f"cache_dir={tmp_path / 'cache'}",
                                              f"run_dir={tmp_path / 'run'}"]), resolve=True)
    good = {"config": cfg, "fingerprint": "f", "units": [["layer1.0"]], "unit_keys": ["pack_00"],
            "mp": {"policy": "none"}}
    run_dir, extra = tmp_path / "run", []
    if fault == "no_results":
        run_dir.mkdir()
    elif fault == "not_a_directory":
        run_dir.write_text("x")
    elif fault == "corrupt_results":
        _finished(tmp_path, good)
        (run_dir / "results.json").write_text(json.dumps(good)[:100])
    elif fault == "incomplete_results":
        _finished(tmp_path, {"config": cfg})
    elif fault == "out_is_directory":
        _finished(tmp_path, good)
        (tmp_path / "o").mkdir()
        extra = ["--out", tmp_path / "o"]
    elif fault == "missing_unit":  # the FP weights are there, the unit file is not
        _finished(tmp_path, good)
    if fault == "missing_unit":
        pytest.importorskip("timm")
        from packptq import fp
        from packptq.data import build_datamodule
        from packptq.zoo.build import ModelConfig

        from packptq.config import typed

        mcfg = typed(ModelConfig, cfg["model"], "model")
        dm = build_datamodule(cfg["data"])
        model = fp.build(mcfg, dm)
        f = fp.weights_file(mcfg, dm, cfg["cache_dir"])
        f.parent.mkdir(parents=True)
        torch.save(model.state_dict(), f)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    rc, out, err = _export_cmd(capsys, run_dir, "--format", "pt", *extra)
    assert rc == code, err
    assert match in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert out == "" and sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


@pytest.mark.slow
def test_export_command_reads_the_units_without_calibrating(tmp_path, capsys):
    """packptq-export rebuilds the run's quantized model from its unit files: the same logits as
    the run's phases give, no calibration lines printed; a damaged unit file is one line."""
    from omegaconf import OmegaConf

    from packptq import pipeline

    run_dir, res = _run_and_export(tmp_path, "resnet18", "w4a4")
    capsys.readouterr()
    out = tmp_path / "out" / "m.onnx"
    rc, stdout, err = _export_cmd(capsys, run_dir, "--format", "onnx", "--out", out)
    assert rc == 0, err
    rep = json.loads(stdout.strip().splitlines()[-1])
    assert rep["path"] == str(out) and out.stat().st_size == rep["bytes"] and rep["agreement"] >= 99.5
    assert rep["source"] == f"read from {len(res['unit_keys'])} unit files"
    assert "RTN" not in err and "recon cache" not in err and "calibrate" not in err
    assert rep["fp_bytes"] > rep["bytes"]
    # the model it exports equals the run's own, read back through its phases
    qm, _, x, _ = export.from_units(run_dir, export.read_results(run_dir))
    cfg = OmegaConf.create(res["config"])
    with torch.no_grad():
        assert torch.equal(qm(x), pipeline.quantized(cfg).twins.qmodel.eval()(x))
    capsys.readouterr()
    unit = run_dir / "unit_01.pt"
    unit.write_bytes(unit.read_bytes()[:500])
    rc, stdout, err = _export_cmd(capsys, run_dir, "--format", "pt", "--out", tmp_path / "x.pt")
    assert rc == 2 and "unit_01.pt is damaged" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.pt").exists() and not list(tmp_path.glob(".x.pt*"))


@pytest.mark.slow
def test_export_command_rebuilds_through_the_phases_when_units_do_not_cover(tmp_path, capsys):
    """An RTN run (packing=none) has no unit files: packptq-export calibrates again, and says so."""
    from packptq import pipeline

    run_dir = tmp_path / "run"
    pipeline.run(tiny_cfg(run_dir, "packing=none", "threads=1"))
    capsys.readouterr()
    rc, stdout, err = _export_cmd(capsys, run_dir, "--format", "pt")
    assert rc == 0, err
    rep = json.loads(stdout.strip().splitlines()[-1])
    assert rep["source"].startswith("rebuilt through the run's phases") and rep["agreement"] == 100.0


@pytest.mark.slow
def test_quantize_api_on_a_model_outside_the_zoo(tmp_path):
    import packptq

    def block(cin, cout, stride):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU())

    torch.manual_seed(0)
    net = nn.Sequential(block(1, 4, 1), block(4, 8, 2), block(8, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 3)).eval()
    x = torch.randn(32, 1, 8, 8)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    qnet, rep = packptq.quantize(net, x, overrides=["quant=w4a4", "packing=block", "recon.iters=5", "threads=1"],
                                 run_dir=str(tmp_path / "q"))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # the model is left as it was
    # the graph rule: the first conv is the stem (prefix), each later conv (BN folded, ReLU
    # joined) a block; family="generic" names the children as blocks instead
    assert rep["family"] == "graph" and rep["blocks"] == ["1.0", "2.0"]
    assert rep["packs"] == [["1.0"], ["2.0"]]
    assert 4.0 < rep["w_bits_avg"] < 8.0 and 0.0 <= rep["calib_agreement"] <= 100.0
    assert (tmp_path / "q" / "packs.json").is_file()
    conv = qnet.get_submodule("1.0")  # a quantized layer: its weight lies on its grid
    w = conv.qweight()
    s = conv.wq.scale.view(-1, 1, 1, 1)
    k = w / s + conv.wq.zero_point.view(-1, 1, 1, 1)
    assert torch.allclose(k, k.round(), atol=1e-3) and k.min() >= 0 and k.max() <= 15
    with torch.no_grad():
        assert qnet(x).shape == (32, 3)


def test_recipe_of_a_checkpoint_model_rebuilds_its_shapes(tmp_path):
    """A model given by model.checkpoint: the recipe carries the checkpoint's patch size and
    class count, not the config's defaults, and needs no checkpoint file to rebuild."""
    import timm

    from packptq.quant import QuantConfig
    from packptq.zoo.build import ModelConfig

    ck = timm.create_model("deit_tiny_patch16_224", num_classes=7, in_chans=1, img_size=16, patch_size=4,
                           depth=1, embed_dim=16, num_heads=2)
    path = tmp_path / "deit.pt"
    torch.save(ck.state_dict(), path)
    mcfg = ModelConfig(name="deit_tiny_patch16_224", checkpoint=str(path), patch_size=8,
                       kwargs={"depth": 1, "embed_dim": 16, "num_heads": 2})
    rec = export.recipe(mcfg, {"num_classes": 5, "in_chans": 1, "img_size": 16}, QuantConfig(), (2, 1, 16, 16))
    assert rec["model"]["checkpoint"] is None and rec["model"]["patch_size"] == 4 and rec["meta"]["num_classes"] == 7
    path.unlink()
    model = export.rebuild(rec)
    assert model.get_submodule("head").layer.weight.shape == (7, 16)
    assert model.get_submodule("patch_embed.proj").layer.weight.shape == (16, 1, 4, 4)


def test_unknown_export_format_stops_the_run_before_compute(tmp_path):
    from packptq import pipeline
    from packptq.config import ConfigError

    with pytest.raises(ConfigError, match=r"export=tflite; use pt\|onnx or null"):
        pipeline.run(tiny_cfg(tmp_path / "run", "export=tflite"))
    assert not (tmp_path / "run").exists()
