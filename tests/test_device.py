"""The trainer section chooses where and in which precision every phase runs: the device
Lightning selects (``runtime.device_of``, including an index such as devices=[1]) reaches FP
training, calibration, scoring, reconstruction and evaluation, and ``trainer.precision``
sets the autocast of the forwards outside a Trainer."""
from __future__ import annotations

import functools

import pytest
import torch

from conftest import compose_cfg, tiny_cfg
from packptq.config import ConfigError
from packptq.evaluate import forward_all, predict, top1
from packptq.runtime import autocast, autocast_dtype, device_of, trainer_kwargs


@pytest.fixture
def two_fake_gpus(monkeypatch):
    """Lightning sees two CUDA devices (only its selection logic runs; nothing is placed)."""
    import lightning.fabric.accelerators.cuda as cuda

    monkeypatch.setattr(cuda, "num_cuda_devices", lambda: 2)
    monkeypatch.setattr(cuda.CUDAAccelerator, "is_available", staticmethod(lambda: True))


@pytest.mark.parametrize("devices,expected", [("[1]", "cuda:1"), ("[0]", "cuda:0"), ("1", "cuda:0")])
def test_trainer_devices_choose_the_cuda_device(two_fake_gpus, devices, expected):
    cfg = compose_cfg(["trainer.accelerator=gpu", f"trainer.devices={devices}"])
    assert device_of(trainer_kwargs(cfg.trainer)) == torch.device(expected)


def test_more_than_one_device_is_refused(two_fake_gpus):
    with pytest.raises(ConfigError, match="selects 2 devices; packptq runs on one"):
        device_of({"accelerator": "gpu", "devices": 2})


def test_accelerator_without_hardware_is_a_config_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match="trainer settings cannot run here"):
        device_of({"accelerator": "gpu", "devices": [1]})


@pytest.mark.parametrize("precision,device,dtype", [
    ("32-true", "cpu", None), ("bf16-mixed", "cpu", torch.bfloat16), ("bf16-mixed", "cuda", torch.bfloat16),
    ("16-mixed", "cuda", torch.float16),
    ("16-mixed", "cpu", torch.bfloat16),  # Lightning's choice: float16 AMP does not exist on the CPU
])
def test_autocast_dtype_follows_the_precision(precision, device, dtype):
    assert autocast_dtype({"precision": precision}, torch.device(device)) == dtype


@pytest.mark.parametrize("precision", ["64-true", "16-true", "bf16-true", "8-bit"])
def test_unsupported_precision_stops_before_heavy_compute(precision, tmp_path, no_heavy_compute):
    from packptq import pipeline

    with pytest.raises(ConfigError, match=f"trainer.precision={precision} is not supported"):
        pipeline.run(tiny_cfg(tmp_path, f"trainer.precision={precision}"))


def test_evaluation_under_bf16_is_close_to_fp32(trained_tiny):
    model, dm, _ = trained_tiny
    cpu = torch.device("cpu")
    x = torch.cat([xb for xb, _ in dm.test_dataloader()])
    fp32 = forward_all(model, x, 64, cpu)
    with autocast({"precision": "bf16-mixed"}, cpu):
        bf16 = forward_all(model, x, 64, cpu)
        preds, labels = predict(model, dm.test_dataloader(), cpu)
    assert fp32.dtype == torch.float32 and bf16.dtype == torch.bfloat16
    diff = (bf16.float() - fp32).abs().max().item()
    assert 0 < diff < 0.1 * fp32.abs().max().item()  # rounded, not another computation
    n = dm.meta()["num_classes"]
    ref = top1(fp32.argmax(-1), labels, n)
    assert abs(top1(preds, labels, n) - ref) <= 2.0
    assert abs(top1(bf16.float().argmax(-1), labels, n) - ref) <= 2.0


def test_trainer_settings_reach_every_phase(trained_tiny, tmp_path, monkeypatch):
    """One run with trainer.accelerator=cpu, devices=1, precision=bf16-mixed (FP weights from a
    checkpoint): the device device_of returns for those settings is the one calibration,
    scoring, reconstruction and evaluation use; their forwards run under bfloat16 autocast;
    every unit's Trainer gets the trainer section."""
    from packptq import calibration, context, evaluate, pipeline, scores
    from packptq.recon import unit as recon_unit

    seen = {}
    marker = torch.device("cpu", 0)  # equal to no default device: only device_of hands it out

    def spy_device_of(kw):
        seen["device_of"] = dict(kw)
        assert device_of(kw) == torch.device("cpu")
        return marker

    def spy(module, name, device_at):
        fn = getattr(module, name)

        def wrapped(*a, **k):
            dev = k["device"] if isinstance(device_at, str) else a[device_at]
            seen.setdefault(name, []).append((dev, torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
            return fn(*a, **k)
        monkeypatch.setattr(module, name, wrapped)

    monkeypatch.setattr(context, "device_of", spy_device_of)
    spy(calibration, "calibrate_twins", 6)
    spy(scores, "hessian_scores", "device")
    spy(evaluate, "evaluate", 2)
    make_trainer = recon_unit.make_trainer

    def spy_make_trainer(kw, *a, **k):
        seen.setdefault("units", []).append(dict(kw))
        return make_trainer(kw, *a, **k)

    monkeypatch.setattr(recon_unit, "make_trainer", spy_make_trainer)
    ckpt = tmp_path / "fp.pt"
    torch.save(trained_tiny[0].state_dict(), ckpt)
    cfg = tiny_cfg(tmp_path / "run", f"model.checkpoint={ckpt}", "trainer.accelerator=cpu", "trainer.devices=1",
                   "trainer.precision=bf16-mixed", "recon.iters=2")
    res = pipeline.run(cfg)

    want = {"accelerator": "cpu", "devices": 1, "precision": "bf16-mixed"}
    assert {k: seen["device_of"][k] for k in want} == want
    assert len(seen["units"]) == len(res["units"])
    for kw in seen["units"]:
        assert {k: kw[k] for k in want} == want
    for phase in ("calibrate_twins", "hessian_scores", "evaluate"):
        assert seen[phase] and all(c == (marker, True, torch.bfloat16) for c in seen[phase]), phase
    assert res["quant_top1"] > 50.0  # ten classes: far above chance


class _Stop(Exception):
    pass


def test_fp_training_gets_the_trainer_section(tmp_path, monkeypatch):
    """FP training (a model without weights, an empty cache) builds its Trainer with the
    accelerator, devices and precision of cfg.trainer."""
    import lightning as L

    from packptq import fp, pipeline

    got = []

    class SpyTrainer(L.Trainer):
        @functools.wraps(L.Trainer.__init__)  # the pipeline checks trainer.* against this signature
        def __init__(self, *a, **kw):
            got.append(kw)
            raise _Stop

    monkeypatch.setattr(fp.L, "Trainer", SpyTrainer)
    cfg = tiny_cfg(tmp_path / "run", f"cache_dir={tmp_path / 'cache'}", "trainer.accelerator=cpu",
                   "trainer.devices=1", "trainer.precision=bf16-mixed")
    with pytest.raises(_Stop):
        pipeline.run(cfg)
    assert len(got) == 1
    assert {k: got[0][k] for k in ("accelerator", "devices", "precision")} == \
        {"accelerator": "cpu", "devices": 1, "precision": "bf16-mixed"}
