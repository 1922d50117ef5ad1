"""Shared test setup: one torch thread (the box is shared), W&B offline, a session-private
PACKPTQ_CACHE (tests never touch ~/.cache), Hydra composition of the real config with a tiny
setting, and one FP-trained tiny resnet18 reused by every test that needs a trained model."""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "packptq" / "conf"

#: a pipeline run in seconds: resnet18 with 8..64 block channels on the 16x16 digits, 64 calibration
#: images, 20 steps per unit. Four epochs (one FP training per session, cached) give a model
#: well above chance, so accuracies and agreements mean something.
TINY = (
    "logger=none",
    "data=digits",
    "data.calib_size=64",
    "model=resnet18",
    "quant=w4a4",
    "+model.kwargs.channels=[8,16,32,64]",
    "model.train_epochs=4",
    "recon.iters=20",
    "progress=false",
)

_CACHE: str | None = None


def pytest_configure(config):
    global _CACHE
    threads = os.environ.get("PACKPTQ_TEST_THREADS")
    torch.set_num_threads(int(threads) if threads else 1)
    os.environ["WANDB_MODE"] = "offline"
    os.environ.setdefault("WANDB_SILENT", "true")
    _CACHE = tempfile.mkdtemp(prefix="packptq-test-cache-")
    os.environ["PACKPTQ_CACHE"] = _CACHE
    os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(_CACHE, "hypothesis"))  # not ./.hypothesis


def pytest_unconfigure(config):
    if _CACHE:
        shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """The session's PACKPTQ_CACHE (FP models trained by tests live here)."""
    return Path(os.environ["PACKPTQ_CACHE"])


def compose_cfg(overrides: Sequence[str] = (), return_hydra_config: bool = False):
    """Compose conf/config.yaml with ``overrides`` (no tiny settings added)."""
    from hydra import compose, initialize_config_dir

    from packptq.schemas import register

    register()  # conf/<group>/base (again: a test may have reset Hydra's singletons)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=return_hydra_config)


def tiny_overrides(run_dir, *overrides: str) -> list:
    """The TINY setting, the run/cache directories, then ``overrides`` (later ones win)."""
    return [*TINY, f"run_dir={run_dir}", f"cache_dir={os.environ['PACKPTQ_CACHE']}", *overrides]


def tiny_cfg(run_dir, *overrides: str):
    return compose_cfg(tiny_overrides(run_dir, *overrides))


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory):
    """(fp_model, datamodule, cfg) for the TINY setting. Trained once per session into the
    session cache, under the same key the pipeline uses, so pipeline runs reuse it."""
    from packptq.config import typed
    from packptq.data import build_datamodule
    from packptq.fp import train_or_load
    from packptq.zoo.build import ModelConfig, build_model

    cfg = tiny_cfg(tmp_path_factory.mktemp("trained_tiny"))
    dm = build_datamodule(cfg.data)
    mcfg = typed(ModelConfig, cfg.model, "model")
    torch.manual_seed(dm.cfg.seed)  # as pipeline.run: one FP initialisation, every session the same
    model = build_model(mcfg, dm.meta())
    dm.attach_model(model)
    dm.setup()
    model, _ = train_or_load(model, dm, mcfg, dm.cfg, Path(cfg.cache_dir),
                             {"accelerator": "cpu", "enable_progress_bar": False})
    return model.eval(), dm, cfg


@pytest.fixture
def no_heavy_compute(monkeypatch):
    """Any FP training, calibration or block scoring reached during the test fails it: bad
    input must be reported before heavy compute."""
    from packptq import calibration, fp, scores

    def boom(*a, **k):
        raise AssertionError("heavy compute reached before the bad input was reported")

    monkeypatch.setattr(fp, "train_or_load", boom)
    monkeypatch.setattr(fp, "_train", boom)
    monkeypatch.setattr(calibration, "calibrate_twins", boom)
    monkeypatch.setattr(scores, "hessian_scores", boom)


@pytest.fixture
def packptq_log(caplog):
    """The records of the library's ``packptq`` logger at INFO and above, as ``caplog.text``
    (its handler is attached to that logger: the command line's set-up stops propagation)."""
    lg = logging.getLogger("packptq")
    level, propagate = lg.level, lg.propagate
    lg.addHandler(caplog.handler)
    lg.setLevel(logging.INFO)
    lg.propagate = False  # each record once (caplog's handler also sits on the root logger)
    try:
        yield caplog
    finally:
        lg.removeHandler(caplog.handler)
        lg.setLevel(level)
        lg.propagate = propagate
